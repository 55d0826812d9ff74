// Stands in for the CUDA header of this name when csrc/cuda/ is compiled for the device emulation.
#pragma once
#include "device_emulation.h"
