// Per-thread state of the CPU emulation (see cuda_runtime.h in this folder).
#include "cuda_runtime.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace emu {
thread_local Block* current_block;
}
