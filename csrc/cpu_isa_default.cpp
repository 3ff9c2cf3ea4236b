// cpu_isa_kernels.h for any CPU: the baseline target of the build (SSE2 on x86-64).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define SUPEREXPERTS_ISA default
#include "cpu_isa_kernels.h"
