// cpu_isa_kernels.h for CPUs with AVX-512 F/BW/VL/DQ (ATen's AVX512 capability). The target is
// set here, for this file only; cpu_isa.cpp calls it only where the CPU has these
// instructions.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "cpu_isa_x86.h"
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
// GCC 12's avx512fintrin.h reads "undefined" vectors on purpose.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define SUPEREXPERTS_ISA avx512
#include "cpu_isa_kernels.h"
#else
#include "cpu_isa.h"
const superexperts::cpu::Kernels* superexperts::cpu::kernels_avx512() { return nullptr; }
#endif
