// 04_cnn_experiments.cpp: the CNN experiments built by a plain C++ compiler (no CUDA). The
// program is 04_cnn_experiments.cu; without nvcc (__CUDACC__ undefined) it uses the CPU
// backend, batchnorm::cpu.
#include "04_cnn_experiments.cu"
