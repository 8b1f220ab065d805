// Multi-tensor loops on the CPU: every tensor of a list is cut into fixed-size chunks and all chunks of all
// tensors run in one at::parallel_for, so one op call is one parallel region whatever the parameter count.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace clfast::cpu {

// 32K elements: big enough to amortise scheduling, small enough to balance 9.6M params over any core count.
constexpr int64_t kChunk = 1 << 15;

struct Chunk {
  int64_t tensor, begin, end;
};

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t)
    for (int64_t b = 0; b < numels[t]; b += kChunk) chunks.push_back({t, b, std::min(numels[t], b + kChunk)});
  return chunks;
}

// Below this many elements in all, a call runs on the calling thread: a parallel region's fork and join cost
// more than they save on small models, and much more when another process holds a core.
constexpr int64_t kParallelMin = 1 << 17;

// at::parallel_for's grain over `chunks`: all of them in one task when the lists are small.
inline int64_t chunk_grain(const std::vector<Chunk>& chunks, const std::vector<int64_t>& numels) {
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  return total < kParallelMin ? std::max<int64_t>(1, static_cast<int64_t>(chunks.size())) : 1;
}

// f(tensor, begin, end) for every chunk, in parallel.
template <typename F>
void for_each_chunk(const std::vector<int64_t>& numels, const F& f) {
  const std::vector<Chunk> chunks = make_chunks(numels);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(chunks, numels), [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) f(chunks[c].tensor, chunks[c].begin, chunks[c].end);
  });
}

// Sum of f(tensor, begin, end) -> double over all chunks. Chunks are fixed, and their partial sums are added
// in order, so the result does not depend on the number of threads.
template <typename F>
double sum_chunks(const std::vector<int64_t>& numels, const F& f) {
  const std::vector<Chunk> chunks = make_chunks(numels);
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), chunk_grain(chunks, numels), [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) partial[c] = f(chunks[c].tensor, chunks[c].begin, chunks[c].end);
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

template <typename T>
std::vector<T*> data_ptrs(const std::vector<at::Tensor>& l) {
  std::vector<T*> out;
  out.reserve(l.size());
  for (const at::Tensor& t : l) out.push_back(t.data_ptr<T>());
  return out;
}

inline std::vector<int64_t> numels(const std::vector<at::Tensor>& l) {
  std::vector<int64_t> out;
  out.reserve(l.size());
  for (const at::Tensor& t : l) out.push_back(t.numel());
  return out;
}

}  // namespace clfast::cpu
