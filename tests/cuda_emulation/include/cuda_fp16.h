// CUDA emulation on the CPU (tests/cuda_emulation): see sasa_cuda_emulation.h.
#pragma once
#include "sasa_cuda_emulation.h"
