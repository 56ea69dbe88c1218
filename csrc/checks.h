// Shape and dtype checks shared by the CPU and CUDA implementations: every op validates its inputs
// on the host with TORCH_CHECK before touching memory, so bad shapes raise instead of reading out
// of bounds.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace tokenreduce {

inline void check_dim(const at::Tensor& t, int64_t ndim, const char* op, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must be ", shape, ", got shape ", t.sizes());
}

// torch's Python spelling of a dtype, as users know it
inline std::string dtype_name(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kBool: return "torch.bool";
    default: return c10::toString(s);
  }
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype_name(dtype), ", got ",
              dtype_name(t.scalar_type()));
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", dtype_name(s));
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.device() == b.device(), op, ": all tensors must be on one device, got ", a.device(), " and ",
              b.device());
}

// hidden-like [B, L, D] with unit stride on D (other strides free, so slices need no copy)
inline at::Tensor rows_view(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// ---- per op, shared by the CPU and CUDA implementations ----

inline void check_pred(const at::Tensor& pred, int64_t bsz, int64_t length, const char* op) {
  check_dim(pred, 2, op, "pred", "[B, L] int64");
  check_dtype(pred, at::kLong, op, "pred");
  TORCH_CHECK(pred.size(0) == bsz && pred.size(1) == length, op, ": pred must be [B, L] = [", bsz, ", ", length,
              "], got ", pred.sizes());
}

inline void check_merge_args(const at::Tensor& hidden, const at::Tensor& size, const at::Tensor& dest,
                      const at::Tensor& index, const char* op) {
  check_dim(hidden, 3, op, "hidden", "[B, L, D]");
  check_float(hidden, op, "hidden");
  const int64_t bsz = hidden.size(0), length = hidden.size(1);
  check_dim(size, 2, op, "size", "[B, L] float32");
  check_dtype(size, at::kFloat, op, "size");
  check_dim(dest, 2, op, "dest", "[B, L] int64");
  check_dtype(dest, at::kLong, op, "dest");
  check_dim(index, 2, op, "index", "[B, L'] int64");
  check_dtype(index, at::kLong, op, "index");
  TORCH_CHECK(size.size(0) == bsz && size.size(1) == length && dest.sizes() == size.sizes(), op,
              ": size and dest must be [B, L] = [", bsz, ", ", length, "], got ", size.sizes(), " and ", dest.sizes());
  TORCH_CHECK(index.size(0) == bsz, op, ": index must have B = ", bsz, " rows, got ", index.sizes());
  check_same_device(hidden, size, op);
  check_same_device(hidden, dest, op);
  check_same_device(hidden, index, op);
}

inline void check_importance_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& q_index,
                           const at::Tensor& key_valid, const char* op) {
  check_dim(query, 4, op, "query", "[B, Hq, Lq, d]");
  check_dim(key, 4, op, "key", "[B, Hkv, Lk, d]");
  check_float(query, op, "query");
  TORCH_CHECK(key.scalar_type() == query.scalar_type(), op, ": query and key must share a dtype, got ",
              query.scalar_type(), " and ", key.scalar_type());
  TORCH_CHECK(key.size(0) == query.size(0) && key.size(3) == query.size(3), op,
              ": query [B, Hq, Lq, d] and key [B, Hkv, Lk, d] must agree on B and d, got ", query.sizes(), " and ",
              key.sizes());
  TORCH_CHECK(key.size(2) == query.size(2), op, ": query and key must cover the same rows (Lq == Lk: q_index and the "
              "causal mask index both), got Lq = ", query.size(2), " and Lk = ", key.size(2));
  TORCH_CHECK(key.size(1) > 0 && query.size(1) % key.size(1) == 0, op, ": query heads (", query.size(1),
              ") must be a multiple of key heads (", key.size(1), ")");
  check_dim(q_index, 2, op, "q_index", "[B, n] int64");
  check_dtype(q_index, at::kLong, op, "q_index");
  TORCH_CHECK(q_index.size(0) == query.size(0), op, ": q_index must have B = ", query.size(0), " rows, got ",
              q_index.sizes());
  check_dim(key_valid, 2, op, "key_valid", "[B, Lk] bool");
  check_dtype(key_valid, at::kBool, op, "key_valid");
  TORCH_CHECK(key_valid.size(0) == key.size(0) && key_valid.size(1) == key.size(2), op, ": key_valid must be [B, Lk] = [",
              key.size(0), ", ", key.size(2), "], got ", key_valid.sizes());
  check_same_device(query, key, op);
  check_same_device(query, q_index, op);
  check_same_device(query, key_valid, op);
}

inline void check_gather_args(const at::Tensor& t, const at::Tensor& index, const char* op) {
  check_dim(t, 5, op, "t", "[P, Bt, M, L, T] (Bt = B or 1)");
  check_dim(index, 2, op, "index", "[B, L'] int64");
  check_dtype(index, at::kLong, op, "index");
  TORCH_CHECK(t.size(1) == index.size(0) || t.size(1) == 1, op, ": t's batch dimension must be B = ", index.size(0),
              " or 1, got t ", t.sizes());
  check_same_device(t, index, op);
}

inline void check_lsh_args(const at::Tensor& x, const at::Tensor& planes, const char* op) {
  check_dim(x, 2, op, "x", "[N, dim]");
  check_dim(planes, 2, op, "planes", "[dim, bits]");
  check_float(x, op, "x");
  check_float(planes, op, "planes");
  TORCH_CHECK(x.size(1) == planes.size(0), op, ": x's last dimension must equal planes' dim ", planes.size(0),
              ", got x ", x.sizes());
  TORCH_CHECK(planes.size(1) >= 1, op, ": planes must have at least one bit");
  check_same_device(x, planes, op);
}

inline void check_hamming_args(const at::Tensor& query, const at::Tensor& store, const char* op) {
  check_dim(query, 2, op, "query", "[Q, W] int64");
  check_dim(store, 2, op, "store", "[S, W] int64");
  check_dtype(query, at::kLong, op, "query");
  check_dtype(store, at::kLong, op, "store");
  TORCH_CHECK(query.size(1) == store.size(1), op, ": query [Q, W] and store [S, W] need the same W, got ",
              query.sizes(), " and ", store.sizes());
  check_same_device(query, store, op);
}

}  // namespace tokenreduce
