// CPU emulation (see cuda_runtime.h in this folder).
#pragma once
#include <cmath>
#define CUDART_INF_F INFINITY
