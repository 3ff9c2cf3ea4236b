// For cpu_isa_avx2.cpp and cpu_isa_avx512.cpp, after their `#pragma GCC target`: the pragma
// sets the code generation but, in C++, not the macros that the matching -m flags define, and
// headers (sleef.h, c10) read those to declare what the target has. These are the macros of
// -mavx2 -mfma -mf16c -mbmi -mbmi2 -mlzcnt -mpopcnt.
#pragma once
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __BMI__ 1
#define __BMI2__ 1
#define __LZCNT__ 1
#define __POPCNT__ 1
