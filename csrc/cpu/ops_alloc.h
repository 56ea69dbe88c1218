// The few ATen functions the CPU kernels call, from their own light headers (not ATen/ATen.h).
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
