// Which SIMD paths this CPU and its OS can run, read at run time (cpuid + XCR0), so that one
// build carries several kernel variants (firp_engine._C_<path>) and loads the best one that
// runs here. Compiled into every variant; it uses no SIMD itself.
#include "cpu_ops.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace firp {

namespace {

#if defined(__x86_64__) || defined(_M_X64)
struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) r = Regs{};
  return r;
}

// XCR0: the register state the OS saves on a context switch. A feature the CPU has but the
// OS does not save (e.g. ZMM registers in some VMs) cannot be used.
uint64_t xcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

bool bit(unsigned reg, int i) { return (reg >> i) & 1u; }

// Linux hands out AMX tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction kills the process.
bool request_amx() {
#if defined(__linux__)
  constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
  return false;
#endif
}
#endif

}  // namespace

std::vector<std::string> cpu_paths() {
  std::vector<std::string> out;
#if defined(__x86_64__) || defined(_M_X64)
  const Regs l1 = cpuid(1, 0), l7 = cpuid(7, 0), l7s1 = cpuid(7, 1);
  if (!bit(l1.c, 27)) return out;  // no OSXSAVE: the OS manages no AVX state at all
  const uint64_t x = xcr0();
  const bool ymm = (x & 0x6) == 0x6, zmm = ymm && (x & 0xE0) == 0xE0, tiles = (x & 0x60000) == 0x60000;
  const bool avx2 = ymm && bit(l1.c, 28) && bit(l1.c, 12) && bit(l1.c, 29) && bit(l7.b, 5);  // avx fma f16c avx2
  const bool avx512 = avx2 && zmm && bit(l7.b, 16) && bit(l7.b, 17) && bit(l7.b, 30) && bit(l7.b, 31);  // f dq bw vl
  // Every CPU with AVX512_BF16 so far also has AVX512_VNNI, which the same build uses.
  const bool avx512bf16 = avx512 && bit(l7s1.a, 5) && bit(l7.c, 11);
  const bool amx = avx512bf16 && tiles && bit(l7.d, 24) && bit(l7.d, 22) && request_amx();  // amx-tile, amx-bf16
  if (amx) out.emplace_back("amx");
  if (avx512bf16) out.emplace_back("avx512bf16");
  if (avx512) out.emplace_back("avx512");
  if (avx2) out.emplace_back("avx2");
#endif
  out.emplace_back("scalar");
  return out;
}

}  // namespace firp
