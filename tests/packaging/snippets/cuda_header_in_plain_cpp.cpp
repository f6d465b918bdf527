// <batchnorm/cuda.cuh> from a plain C++ compiler. Expected: one error that says to use nvcc.
#include <batchnorm/cuda.cuh>

int main() { return 0; }
