// cpu_isa_kernels.h for CPUs with AVX2 and FMA (ATen's AVX2 capability). The target is set
// here, for this file only; cpu_isa.cpp calls it only where the CPU has these instructions.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "cpu_isa_x86.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define SUPEREXPERTS_ISA avx2
#include "cpu_isa_kernels.h"
#else
#include "cpu_isa.h"
const superexperts::cpu::Kernels* superexperts::cpu::kernels_avx2() { return nullptr; }
#endif
