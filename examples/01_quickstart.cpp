// 01_quickstart.cpp: the quickstart built by a plain C++ compiler (no CUDA). The program
// is 01_quickstart.cu; without nvcc (__CUDACC__ undefined) it uses the CPU backend only.
#include "01_quickstart.cu"
