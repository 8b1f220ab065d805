// CLFAST_HD marks math shared by host and device code; the math headers include nothing from torch, so the
// same text compiles under nvcc and the host compiler.
#pragma once
#if defined(__CUDACC__)
#define CLFAST_HD __host__ __device__
#else
#define CLFAST_HD
#endif
