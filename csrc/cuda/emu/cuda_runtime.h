// CPU emulation of the slice of CUDA the kernels in csrc/cuda use, so that tests can run
// them on a machine without a GPU (tests/test_cuda_build.py, marked slow).
//
// How: the test copies each .cu to a .cpp, rewriting `kernel<<<grid, block, smem, stream>>>(args)`
// into `::emu::Launcher(grid, block, smem, stream)(kernel, args)`, and compiles it with g++
// against this folder instead of the CUDA headers. Blocks run one after another; the threads of
// a block are real threads, so __syncthreads and the warp shuffles are barriers, and `__shared__`
// becomes `static` (one copy, used by one block at a time). A shuffle executed by only part of
// a warp, or a barrier some threads skip, deadlocks here as it would misbehave on a GPU.
// Not a model of the GPU's memory system: alignment, coalescing and speed are not checked.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

typedef enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 } cudaError_t;
typedef void* cudaStream_t;
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

using std::max;
using std::min;
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
// volatile: one rounding per operation, no contraction into an FMA (as the _rn intrinsics).
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }

namespace emu {

struct Warp {
  std::barrier<> bar{32};
  float slot[32];
};

struct Block {
  explicit Block(unsigned threads) : bar(threads), warps((threads + 31) / 32) {}
  std::barrier<> bar;
  std::atomic<int> flag{0};
  std::vector<Warp> warps;
};

extern thread_local Block* current_block;

struct Launcher {
  dim3 grid, block;
  Launcher(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {}

  template <class Kernel, class... Args>
  void operator()(Kernel kernel, Args... args) const {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) run_block(uint3{x, y, z}, kernel, args...);
  }

  template <class Kernel, class... Args>
  void run_block(uint3 id, Kernel kernel, Args... args) const {
    Block blk(block.x);
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block.x; ++t)
      threads.emplace_back([&, t] {
        threadIdx = uint3{t, 0, 0};
        blockIdx = id;
        blockDim = block;
        gridDim = grid;
        current_block = &blk;
        kernel(args...);
        // An exited thread no longer takes part in barriers (as on the GPU).
        blk.warps[t / 32].bar.arrive_and_drop();
        blk.bar.arrive_and_drop();
      });
    for (auto& th : threads) th.join();
  }
};

}  // namespace emu

inline void __syncthreads() { emu::current_block->bar.arrive_and_wait(); }

inline int __syncthreads_or(int predicate) {
  emu::Block& b = *emu::current_block;
  if (predicate) b.flag.store(1);
  b.bar.arrive_and_wait();
  const int any = b.flag.load();
  b.bar.arrive_and_wait();
  if (threadIdx.x == 0) b.flag.store(0);
  b.bar.arrive_and_wait();
  return any;
}

inline float emu_shuffle(float v, int src_lane) {
  emu::Warp& w = emu::current_block->warps[threadIdx.x / 32];
  w.slot[threadIdx.x % 32] = v;
  w.bar.arrive_and_wait();
  const float r = w.slot[src_lane];
  w.bar.arrive_and_wait();
  return r;
}
inline float __shfl_sync(unsigned, float v, int src_lane) { return emu_shuffle(v, src_lane); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return emu_shuffle(v, (threadIdx.x % 32) ^ mask); }
