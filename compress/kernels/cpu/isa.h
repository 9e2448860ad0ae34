// The instruction set the kernels use, chosen once at run time from what the CPU reports; shared by every
// source file of the extension (an inline function's static is one object program-wide).
#pragma once

#include <cstdint>

namespace compress_isa {

enum class Isa { portable, avx2, avx512 };

inline Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::portable;
}

// The level in use: detect()'s, or a lower one forced by set_isa (tests run every path on one machine).
inline Isa& chosen() {
  static Isa isa = detect();
  return isa;
}

// AVX-512 integer dot products need VNNI (vpdpbusd) and VBMI (vpermb) besides F and BW: Ice Lake, Sapphire
// Rapids, Zen 4 and later. Without them the integer kernels take the AVX2 path.
inline bool has_avx512_int8() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

}  // namespace compress_isa
