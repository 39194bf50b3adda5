// Shared helpers of msbp's native kernels (one .cpp per op stem includes this).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
