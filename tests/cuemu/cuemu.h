// cuemu: runs the project's CUDA kernels on the CPU, for the test suite. The kernel and launcher sources of
// csrc/ are compiled by the host compiler with this header included first (tests/cuemu/build.py), and each
// launch runs here:
//   - the blocks of a grid one after another, in the order CLFAST_EMU_BLOCK_ORDER asks for (forward, reverse or
//     shuffle; CLFAST_EMU_SEED seeds the shuffle);
//   - the threads of a block as cooperative fibers that switch at every barrier and warp operation, each with
//     its own threadIdx, blockIdx, blockDim and gridDim, resumed in the order CLFAST_EMU_THREAD_ORDER asks for
//     (forward, reverse or shuffle: a thread that runs ahead to the next barrier overwrites shared memory before
//     or after the others read it); __shared__ variables are static, so one copy serves the block that runs;
//   - __syncthreads and its _or/_and/_count forms, checking that every live thread waits at the same call site;
//     shuffles, votes and __syncwarp through a per-warp exchange, checking the masks; atomics through
//     std::atomic_ref;
//   - a barrier or warp operation that can never complete is an error, not a hang; launch limits (grid and block
//     dimensions, 4 KB of kernel parameters) are checked;
//   - CLFAST_EMU_TRACE=<file> appends one line per launch: the kernel's name as written in csrc/, then its
//     template arguments.
// Errors are thrown as std::runtime_error from the launch, after the failing block is abandoned.
//
// Under ThreadSanitizer each thread of a block is a TSan fiber that switches without synchronising, and every
// barrier and warp exchange is annotated as a release by each arriving thread and an acquire by each released
// one: TSan then sees exactly the ordering CUDA guarantees, and reports accesses that no barrier orders.
#pragma once
#if defined(__CUDACC__)
#error "cuemu.h is for host-compiled builds of the CUDA sources"
#endif

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_THREAD__)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#define CUEMU_TSAN 1
#endif
#if defined(__SANITIZE_ADDRESS__)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#define CUEMU_ASAN 1
#endif

// The emulator's own functions: under TSan they are not instrumented (their bookkeeping is ordered by the
// fiber switches, which TSan is told not to see), and only the kernels' accesses are checked.
#if defined(CUEMU_TSAN)
#define CUEMU_INTERNAL inline __attribute__((noinline, no_sanitize_thread))
#else
#define CUEMU_INTERNAL inline
#endif

namespace cuemu {
// Under TSan, the accesses of the emulator's bookkeeping (and of the library code it calls) are ignored while
// one of these lives; elsewhere it is empty. fail() ends the ignores of the frames it abandons.
struct Unchecked {
#if defined(__SANITIZE_THREAD__)
  Unchecked();
  ~Unchecked();
  static void begin() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  static void end() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#endif
};
}  // namespace cuemu

// The fiber switch: saves the callee-saved registers and the floating-point control words on the running stack,
// stores its stack pointer in *save and continues on the stack `load` (a stack saved the same way, or one made by
// new_stack). No system call, unlike swapcontext.
#if !defined(__x86_64__)
#error "cuemu: the fiber switch is written for x86-64"
#endif
extern "C" void cuemu_switch(void** save, void* load);
extern "C" void cuemu_start();
asm(R"(
  .pushsection .text
  .weak cuemu_switch
  .type cuemu_switch, @function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch, .-cuemu_switch
  .weak cuemu_start
  .type cuemu_start, @function
cuemu_start:
  andq $-16, %rsp
  call *%r12
  ud2
  .size cuemu_start, .-cuemu_start
  .popsection
)");

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

namespace cuemu {

constexpr int kWarpSize = 32;
constexpr size_t kParamLimit = 4096;

struct Fiber {
  void* sp = nullptr;  // its saved stack pointer while switched out
  void* stack = nullptr;
  size_t stack_size = 0;
  dim3 tid;
  int linear = 0;
  enum State { kReady, kBlockBarrier, kWarpOp, kDone } state = kReady;
  const char* file = nullptr;  // the call site it waits at
  int line = 0;
  uint64_t xfer = 0, result = 0;  // warp exchange: this lane's value, its result
  int arg = 0;
#if defined(CUEMU_TSAN)
  void* tsan = nullptr;               // the TSan thread it runs as in this block: one of
  void* tsan_threads[4] = {};         // these, by turns, so that neighbouring blocks are never ordered
  int unchecked = 0;                  // live Unchecked scopes
#endif
};

enum class BarrierKind { kSync, kOr, kAnd, kCount };
enum class WarpKind { kShflDown, kShflUp, kShflXor, kShfl, kBallot, kAny, kAll, kSyncwarp };

inline const char* warp_kind_name(WarpKind k) {
  switch (k) {
    case WarpKind::kShflDown: return "__shfl_down_sync";
    case WarpKind::kShflUp: return "__shfl_up_sync";
    case WarpKind::kShflXor: return "__shfl_xor_sync";
    case WarpKind::kShfl: return "__shfl_sync";
    case WarpKind::kBallot: return "__ballot_sync";
    case WarpKind::kAny: return "__any_sync";
    case WarpKind::kAll: return "__all_sync";
    default: return "__syncwarp";
  }
}

struct WarpState {
  unsigned arrived = 0, mask = 0;
  WarpKind kind = WarpKind::kSyncwarp;
  int width = kWarpSize;
  unsigned episode = 0;
  const char* file = nullptr;
  int line = 0;
};

// The one emulated device: launches are serialised, and the running block's state lives here.
struct Device {
  std::mutex launch_mutex;
  void* scheduler = nullptr;  // the scheduler's saved stack pointer while a fiber runs
  std::vector<Fiber> fibers;  // one per thread slot, kept across launches with their stacks
  int threads = 0;            // the running block's threads: fibers[0, threads)
  std::vector<int> schedule;  // the order in which the scheduler resumes them (CLFAST_EMU_THREAD_ORDER)
  std::vector<WarpState> warps;
  Fiber* current = nullptr;
  dim3 block_idx, block_dim, grid_dim;
  int live = 0;
  // the block barrier being gathered
  int arrived = 0;
  const char* barrier_file = nullptr;
  int barrier_line = 0;
  BarrierKind barrier_kind = BarrierKind::kSync;
  int votes = 0;
  unsigned episode = 0;  // of the block barrier
  // The addresses TSan's release/acquire annotations name, fresh for every block (freeing them forgets their
  // history, so no order carries over from one block to the next): [0] the block's start (the host's writes
  // before the launch), [1] its end (what the host reads after it), [2 + e % 2] the block barrier's episode e,
  // [4 + 2 w + e % 2] warp w's exchange e. Start and end are apart (a thread that starts after another ended
  // is not ordered after it), and so are consecutive episodes (a thread released from one, not yet resumed,
  // is not ordered after what others do before the next).
  char* sync = nullptr;
  std::string error;  // set by a fiber that found an error; the scheduler abandons the block
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
#if defined(CUEMU_TSAN)
  void* tsan_scheduler = nullptr;
#endif
#if defined(CUEMU_ASAN)
  void* asan_fake_stack = nullptr;
  const void* asan_main_bottom = nullptr;  // the scheduler's stack, for switching back to it
  size_t asan_main_size = 0;
#endif
};

inline Device& device() {
  static Device d;
  return d;
}

#if defined(CUEMU_TSAN)
inline __attribute__((no_sanitize_thread)) Unchecked::Unchecked() {
  begin();
  if (Fiber* f = device().current) ++f->unchecked;
}
inline __attribute__((no_sanitize_thread)) Unchecked::~Unchecked() {
  if (Fiber* f = device().current) --f->unchecked;
  end();
}
#endif

CUEMU_INTERNAL Fiber& self() {
  const Unchecked unchecked;
  return *device().current;
}

inline std::string where(const char* file, int line) {
  const char* base = std::strstr(file, "csrc/");
  return std::string(base ? base : file) + ":" + std::to_string(line);
}

inline std::string thread_name(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + ", " + std::to_string(f.tid.y) + ", " + std::to_string(f.tid.z) +
         ")";
}

CUEMU_INTERNAL void tsan_release(int slot) {
#if defined(CUEMU_TSAN)
  __tsan_release(device().sync + slot);
#else
  (void)slot;
#endif
}

CUEMU_INTERNAL void tsan_acquire(int slot) {
#if defined(CUEMU_TSAN)
  __tsan_acquire(device().sync + slot);
#else
  (void)slot;
#endif
}

// Switch from the running fiber back to the scheduler, which resumes it once it is ready again.
CUEMU_INTERNAL void yield() {
  Device& d = device();
  Fiber& f = *d.current;
#if defined(CUEMU_TSAN)
  __tsan_switch_to_fiber(d.tsan_scheduler, 1 /* no sync */);
#endif
#if defined(CUEMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, d.asan_main_bottom, d.asan_main_size);
#endif
  cuemu_switch(&f.sp, d.scheduler);
#if defined(CUEMU_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// A fiber that found an error records it and never runs again.
[[noreturn]] CUEMU_INTERNAL void fail(const std::string& message) {
  {
    const Unchecked unchecked;
    Device& d = device();
    if (d.error.empty()) d.error = message;
  }
#if defined(CUEMU_TSAN)
  for (Fiber* f = device().current; f->unchecked > 0; --f->unchecked) Unchecked::end();
#endif
  for (;;) yield();
}

CUEMU_INTERNAL void release_block_barrier() {
  const Unchecked unchecked;
  Device& d = device();
  for (int i = 0; i < d.threads; ++i)
    if (Fiber& f = d.fibers[i]; f.state == Fiber::kBlockBarrier) {
      f.state = Fiber::kReady;
      switch (d.barrier_kind) {
        case BarrierKind::kOr: f.result = d.votes > 0; break;
        case BarrierKind::kAnd: f.result = d.votes == d.arrived; break;
        case BarrierKind::kCount: f.result = static_cast<uint64_t>(d.votes); break;
        default: f.result = 0;
      }
    }
  d.arrived = 0;
  d.votes = 0;
  d.barrier_file = nullptr;
  ++d.episode;
}

CUEMU_INTERNAL unsigned episode_of_block() {
  const Unchecked unchecked;
  return device().episode;
}

CUEMU_INTERNAL int sync_block(const char* file, int line, BarrierKind kind, int vote) {
  Device& d = device();
  Fiber& f = self();
  const int slot = 2 + static_cast<int>(episode_of_block() % 2);
  tsan_release(slot);
  {  // the bookkeeping, unchecked; not across the switch, where another fiber may fail and abandon this one
    const Unchecked unchecked;
    if (d.arrived == 0) {
      d.barrier_file = file;
      d.barrier_line = line;
      d.barrier_kind = kind;
    } else if (d.barrier_line != line || std::strcmp(d.barrier_file, file) != 0) {
      fail(thread_name(f) + " of block (" + std::to_string(d.block_idx.x) + ", " + std::to_string(d.block_idx.y) +
           ", " + std::to_string(d.block_idx.z) + ") waits at the barrier at " + where(file, line) +
           " while other threads wait at " + where(d.barrier_file, d.barrier_line));
    }
    f.state = Fiber::kBlockBarrier;
    f.file = file;
    f.line = line;
    d.votes += vote != 0;
    if (++d.arrived == d.live) release_block_barrier();
  }
  yield();
  tsan_acquire(slot);
  const Unchecked unchecked;
  return static_cast<int>(f.result);
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp exchange of a value over 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

CUEMU_INTERNAL void release_warp(int w) {
  const Unchecked unchecked;
  Device& d = device();
  WarpState& ws = d.warps[w];
  const int base = w * kWarpSize;
  unsigned ballot = 0;
  for (int l = 0; l < kWarpSize; ++l)
    if ((ws.mask >> l) & 1u) ballot |= (d.fibers[base + l].arg != 0 ? 1u : 0u) << l;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!((ws.mask >> l) & 1u)) continue;
    Fiber& f = d.fibers[base + l];
    const int seg = l / ws.width * ws.width;
    int src = l;
    switch (ws.kind) {
      case WarpKind::kShflDown: src = l + f.arg < seg + ws.width ? l + f.arg : l; break;
      case WarpKind::kShflUp: src = l - f.arg >= seg ? l - f.arg : l; break;
      case WarpKind::kShflXor: src = (l ^ f.arg) < seg + ws.width ? (l ^ f.arg) : l; break;
      case WarpKind::kShfl: src = seg + ((f.arg % ws.width) + ws.width) % ws.width; break;
      default: break;
    }
    switch (ws.kind) {
      case WarpKind::kBallot: f.result = ballot; break;
      case WarpKind::kAny: f.result = ballot != 0; break;
      case WarpKind::kAll: f.result = ballot == ws.mask; break;
      case WarpKind::kSyncwarp: f.result = 0; break;
      default:
        if (!((ws.mask >> src) & 1u))
          fail("lane " + std::to_string(l) + " of warp " + std::to_string(w) + " reads lane " + std::to_string(src) +
               " in " + warp_kind_name(ws.kind) + " at " + where(ws.file, ws.line) + ", which is not in the mask");
        f.result = d.fibers[base + src].xfer;
    }
    f.state = Fiber::kReady;
  }
  ws.arrived = 0;
  ws.file = nullptr;
  ++ws.episode;
}

// A lane's arrival at a warp operation; returns its TSan slot.
CUEMU_INTERNAL int warp_arrive(const char* file, int line, WarpKind kind, unsigned mask, uint64_t value, int arg,
                               int width) {
  const Unchecked unchecked;
  Device& d = device();
  Fiber& f = self();
  const int w = f.linear / kWarpSize, lane = f.linear % kWarpSize;
  const int lanes_here = std::min(kWarpSize, d.threads - w * kWarpSize);
  const unsigned existing = lanes_here == kWarpSize ? 0xffffffffu : ((1u << lanes_here) - 1u);
  const std::string op = std::string(warp_kind_name(kind)) + " at " + where(file, line);
  if (!((mask >> lane) & 1u)) fail("lane " + std::to_string(lane) + " calls " + op + " with a mask that excludes it");
  if (mask & ~existing) fail(op + ": the mask names lanes the block does not have");
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0)
    fail(op + ": width " + std::to_string(width) + " is not a power of two up to 32");
  WarpState& ws = d.warps[w];
  if (ws.arrived == 0) {
    ws.mask = mask;
    ws.kind = kind;
    ws.width = width;
    ws.file = file;
    ws.line = line;
  } else if (ws.mask != mask || ws.kind != kind || ws.line != line || std::strcmp(ws.file, file) != 0) {
    fail("the lanes of warp " + std::to_string(w) + " disagree: " + op + " with mask " + std::to_string(mask) +
         " while others wait at " + warp_kind_name(ws.kind) + " at " + where(ws.file, ws.line) + " with mask " +
         std::to_string(ws.mask));
  }
  f.state = Fiber::kWarpOp;
  f.file = file;
  f.line = line;
  f.xfer = value;
  f.arg = arg;
  ws.arrived |= 1u << lane;
  const int slot = 4 + 2 * w + static_cast<int>(ws.episode % 2);
  if (ws.arrived == ws.mask) release_warp(w);
  return slot;
}

// Unchecked bookkeeping on either side of the switch, not across it: another lane may fail there and abandon
// this fiber.
CUEMU_INTERNAL uint64_t warp_op(const char* file, int line, WarpKind kind, unsigned mask, uint64_t value, int arg,
                                int width) {
  const int slot = warp_arrive(file, line, kind, mask, value, arg, width);
  tsan_release(slot);
  yield();
  tsan_acquire(slot);
  const Unchecked unchecked;
  return self().result;
}

CUEMU_INTERNAL void fiber_main() {
  Device& d = device();
#if defined(CUEMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &d.asan_main_bottom, &d.asan_main_size);
#endif
  tsan_acquire(0);  // what the host wrote before the launch
  d.body(d.body_arg);
  {
    const Unchecked unchecked;
    Fiber& f = self();
    f.state = Fiber::kDone;
    --d.live;
    if (d.arrived > 0 && d.arrived == d.live) release_block_barrier();  // exited threads do not hold a barrier
  }
  tsan_release(1);  // the host reads the results after the launch
#if defined(CUEMU_TSAN)
  __tsan_switch_to_fiber(d.tsan_scheduler, 1);
#endif
#if defined(CUEMU_ASAN)
  __sanitizer_start_switch_fiber(nullptr, d.asan_main_bottom, d.asan_main_size);
#endif
  cuemu_switch(&self().sp, d.scheduler);  // never resumed
}

inline size_t stack_size() {
#if defined(CUEMU_TSAN) || defined(CUEMU_ASAN)
  return size_t(1) << 20;
#else
  return size_t(256) << 10;
#endif
}

// Stacks are mapped once per thread slot and kept, with a guard page below each.
inline void ensure_stacks(std::vector<Fiber>& fibers) {
  for (Fiber& f : fibers) {
    if (f.stack != nullptr) continue;
    const size_t page = 4096, size = stack_size();
    void* p = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuemu: cannot map a thread stack");
    mprotect(p, page, PROT_NONE);
    f.stack = static_cast<char*>(p) + page;
    f.stack_size = size;
  }
}

CUEMU_INTERNAL std::string describe_stuck(const Device& d) {
  const Unchecked unchecked;
  std::ostringstream s;
  s << "block (" << d.block_idx.x << ", " << d.block_idx.y << ", " << d.block_idx.z << ") can never finish:";
  int shown = 0;
  for (int i = 0; i < d.threads; ++i) {
    const Fiber& f = d.fibers[i];
    if (f.state == Fiber::kDone || shown == 4) continue;
    ++shown;
    s << " " << thread_name(f) << " waits at "
      << (f.state == Fiber::kBlockBarrier ? "__syncthreads" : warp_kind_name(d.warps[f.linear / kWarpSize].kind))
      << " (" << where(f.file, f.line) << ");";
  }
  s << " the threads that would complete it have exited or wait elsewhere";
  return s.str();
}

// A stack on which cuemu_switch starts entry(): the frame cuemu_switch pops, with r12 = entry, returning into
// cuemu_start, which calls it.
inline void* new_stack(void* base, size_t size, void (*entry)()) {
  uint64_t* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(base) + size) & ~uintptr_t(15));
  uint64_t* sp = top - 10;
  uint32_t control[2] = {0, 0};
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "+m"(control[1]));
  std::memcpy(sp, control, 8);                                  // mxcsr, x87 control word
  sp[1] = 0;                                                    // r15
  sp[2] = 0;                                                    // r14
  sp[3] = 0;                                                    // r13
  sp[4] = reinterpret_cast<uint64_t>(entry);                    // r12
  sp[5] = 0;                                                    // rbx
  sp[6] = 0;                                                    // rbp
  sp[7] = reinterpret_cast<uint64_t>(&cuemu_start);             // return address
  return sp;
}

// Runs one block to completion; returns an error message, or an empty string.
CUEMU_INTERNAL std::string run_block(Device& d) {
  const Unchecked unchecked;
  const int n = d.threads;
  for (int i = 0; i < n; ++i) {
    Fiber& f = d.fibers[i];
    f.sp = new_stack(f.stack, f.stack_size, &fiber_main);
    f.state = Fiber::kReady;
  }
  const std::unique_ptr<char[]> sync(new char[4 + 2 * d.warps.size()]);
  d.sync = sync.get();
#if defined(CUEMU_TSAN)
  __tsan_release(d.sync);  // the host's writes before the launch happen before every thread
#endif
  for (WarpState& w : d.warps) w = WarpState{};
  d.live = n;
  d.arrived = 0;
  d.votes = 0;
  d.episode = 0;
  d.error.clear();
  for (;;) {
    bool ran = false;
    for (const int i : d.schedule) {
      Fiber& f = d.fibers[i];
      if (f.state != Fiber::kReady) continue;
      ran = true;
      d.current = &f;
#if defined(CUEMU_TSAN)
      __tsan_switch_to_fiber(f.tsan, 1);
#endif
#if defined(CUEMU_ASAN)
      __sanitizer_start_switch_fiber(&d.asan_fake_stack, f.stack, f.stack_size);
#endif
      cuemu_switch(&d.scheduler, f.sp);
#if defined(CUEMU_ASAN)
      __sanitizer_finish_switch_fiber(d.asan_fake_stack, nullptr, nullptr);
#endif
      d.current = nullptr;
      if (!d.error.empty()) break;
    }
    if (!d.error.empty() || d.live == 0 || !ran) break;
  }
  std::string error = !d.error.empty() ? d.error : d.live > 0 ? describe_stuck(d) : std::string();
#if defined(CUEMU_TSAN)
  __tsan_acquire(d.sync + 1);
#endif
  d.sync = nullptr;
  return error;
}

// The kernel's name as written in csrc/ followed by its template arguments, from the compiler's spelling of
// name<K>() ("... [with auto K = ns::kernel<float>]"), namespaces dropped.
template <auto K>
std::string kernel_name() {
  std::string s = __PRETTY_FUNCTION__;
  const size_t eq = s.find("K = ") + 4;
  s = s.substr(eq, std::min(s.find(';', eq), s.rfind(']')) - eq);
  if (!s.empty() && s[0] == '&') s.erase(0, 1);
  for (size_t at; (at = s.find("{anonymous}::")) != std::string::npos;) s.erase(at, 13);
  std::string out;
  for (size_t i = 0; i < s.size();) {  // drop every namespace qualifier ("a::b::" before an identifier)
    size_t j = i;
    while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
    if (j > i && s.compare(j, 2, "::") == 0) {
      i = j + 2;
      continue;
    }
    if (j == i) j = i + 1;
    out.append(s, i, j - i);
    i = j;
  }
  return out;
}

template <typename R, typename... P>
constexpr size_t param_bytes(R (*)(P...)) {
  size_t n = 0;
  ((n = (n + alignof(std::decay_t<P>) - 1) / alignof(std::decay_t<P>) * alignof(std::decay_t<P>) +
        sizeof(std::decay_t<P>)),
   ...);
  return n;
}

inline void check_launch(const std::string& name, dim3 grid, dim3 block, size_t shmem, size_t params) {
  const auto bad = [&](const std::string& what) {
    throw std::runtime_error("cuemu: launch of " + name + ": " + what);
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0)
    bad("a grid or block dimension is 0 (grid " + std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" +
        std::to_string(grid.z) + ", block " + std::to_string(block.x) + "x" + std::to_string(block.y) + "x" +
        std::to_string(block.z) + ")");
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) bad("the grid exceeds 2^31-1 x 65535 x 65535");
  if (block.x > 1024u || block.y > 1024u || block.z > 64u || uint64_t(block.x) * block.y * block.z > 1024u)
    bad("the block exceeds 1024 threads (x, y <= 1024, z <= 64)");
  if (shmem > 48u * 1024u) bad("more than 48 KB of dynamic shared memory");
  if (params > kParamLimit) bad(std::to_string(params) + " bytes of kernel parameters (the limit is 4 KB)");
}

inline void trace(const std::string& name) {
  static const char* path = std::getenv("CLFAST_EMU_TRACE");
  if (path == nullptr || *path == '\0') return;
  if (FILE* f = std::fopen(path, "a")) {
    std::fprintf(f, "%s\n", name.c_str());
    std::fclose(f);
  }
}

// Puts v in the order the environment variable `var` asks for: forward (as is), reverse or shuffle (seeded by
// CLFAST_EMU_SEED).
template <typename V>
void arrange(std::vector<V>& v, const char* var) {
  const char* mode = std::getenv(var);
  const std::string m = mode ? mode : "forward";
  if (m == "reverse") {
    std::reverse(v.begin(), v.end());
  } else if (m == "shuffle") {
    const char* seed = std::getenv("CLFAST_EMU_SEED");
    std::mt19937_64 rng(seed ? std::strtoull(seed, nullptr, 10) : 0);
    std::shuffle(v.begin(), v.end(), rng);
  } else if (m != "forward") {
    throw std::runtime_error(std::string("cuemu: ") + var + " must be forward, reverse or shuffle, got " + m);
  }
}

inline std::vector<dim3> block_order(dim3 grid) {
  std::vector<dim3> order;
  order.reserve(size_t(grid.x) * grid.y * grid.z);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
  arrange(order, "CLFAST_EMU_BLOCK_ORDER");
  return order;
}

template <auto K, typename Tuple>
void run_thread(void* arg) {
  std::apply(K, *static_cast<Tuple*>(arg));  // each thread gets its own copies of the parameters
}

template <auto K, typename... Args>
void launch(dim3 grid, dim3 block, size_t shmem, Args&&... args) {
  const std::string name = kernel_name<K>();
  check_launch(name, grid, block, shmem, param_bytes(K));
  Device& d = device();
  const std::lock_guard<std::mutex> lock(d.launch_mutex);
  trace(name);
  using Tuple = std::tuple<std::decay_t<Args>...>;
  Tuple params(std::forward<Args>(args)...);
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (static_cast<int>(d.fibers.size()) < threads) d.fibers.resize(threads);
  ensure_stacks(d.fibers);
  d.threads = threads;
  for (int i = 0; i < threads; ++i) {
    Fiber& f = d.fibers[i];
    f.linear = i;
    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
  }
  d.warps.assign((threads + kWarpSize - 1) / kWarpSize, WarpState{});
  d.schedule.resize(threads);
  for (int i = 0; i < threads; ++i) d.schedule[i] = i;
  arrange(d.schedule, "CLFAST_EMU_THREAD_ORDER");
  d.grid_dim = grid;
  d.block_dim = block;
  d.body = &run_thread<K, Tuple>;
  d.body_arg = &params;
#if defined(CUEMU_TSAN)
  d.tsan_scheduler = __tsan_get_current_fiber();
#endif
  std::string error;
  size_t serial = 0;
  for (const dim3& b : block_order(grid)) {
    d.block_idx = b;
#if defined(CUEMU_TSAN)
    // TSan threads are kept (creating them costs more than the kernels) and taken by turns: a thread slot's
    // accesses in one block are ordered before its accesses four blocks later, never in the next three.
    for (int i = 0; i < threads; ++i) {
      void*& t = d.fibers[i].tsan_threads[serial % 4];
      if (t == nullptr) t = __tsan_create_fiber(0);
      d.fibers[i].tsan = t;
    }
#endif
    ++serial;
    error = run_block(d);
    if (!error.empty()) break;
  }
#if defined(CUEMU_TSAN)
  // The launch is over, also for the threads of a block abandoned on an error: everything they did happens
  // before what the host does next (a synchronising switch to each and back).
  for (int i = 0; i < threads; ++i)
    for (void* t : d.fibers[i].tsan_threads)
      if (t != nullptr) {
        __tsan_switch_to_fiber(t, 0);
        __tsan_switch_to_fiber(d.tsan_scheduler, 0);
      }
#endif
#if defined(CUEMU_ASAN)
  // The frames of a block abandoned on an error never returned, so their redzones are still poisoned; the
  // next launch's frames on these stacks must not meet them.
  if (!error.empty())
    for (int i = 0; i < threads; ++i) __asan_unpoison_memory_region(d.fibers[i].stack, d.fibers[i].stack_size);
#endif
  if (!error.empty()) throw std::runtime_error("cuemu: " + name + ": " + error);
}

}  // namespace cuemu

namespace cuemu {
CUEMU_INTERNAL dim3 thread_idx() {
  const Unchecked unchecked;
  return device().current->tid;
}
CUEMU_INTERNAL dim3 block_idx() {
  const Unchecked unchecked;
  return device().block_idx;
}
CUEMU_INTERNAL dim3 block_dim() {
  const Unchecked unchecked;
  return device().block_dim;
}
CUEMU_INTERNAL dim3 grid_dim() {
  const Unchecked unchecked;
  return device().grid_dim;
}
}  // namespace cuemu

#define threadIdx (::cuemu::thread_idx())
#define blockIdx (::cuemu::block_idx())
#define blockDim (::cuemu::block_dim())
#define gridDim (::cuemu::grid_dim())
#define warpSize 32

#define __syncthreads() ::cuemu::sync_block(__FILE__, __LINE__, ::cuemu::BarrierKind::kSync, 0)
#define __syncthreads_or(p) ::cuemu::sync_block(__FILE__, __LINE__, ::cuemu::BarrierKind::kOr, (p))
#define __syncthreads_and(p) ::cuemu::sync_block(__FILE__, __LINE__, ::cuemu::BarrierKind::kAnd, (p))
#define __syncthreads_count(p) ::cuemu::sync_block(__FILE__, __LINE__, ::cuemu::BarrierKind::kCount, (p))

namespace cuemu {
template <typename T>
T shfl(const char* file, int line, WarpKind kind, unsigned mask, T v, int arg, int width) {
  return from_bits<T>(warp_op(file, line, kind, mask, to_bits(v), arg, width));
}
}  // namespace cuemu

#define __shfl_down_sync(mask, v, ...) ::cuemu::shfl_call(__FILE__, __LINE__, ::cuemu::WarpKind::kShflDown, mask, v, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) ::cuemu::shfl_call(__FILE__, __LINE__, ::cuemu::WarpKind::kShflUp, mask, v, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) ::cuemu::shfl_call(__FILE__, __LINE__, ::cuemu::WarpKind::kShflXor, mask, v, __VA_ARGS__)
#define __shfl_sync(mask, v, ...) ::cuemu::shfl_call(__FILE__, __LINE__, ::cuemu::WarpKind::kShfl, mask, v, __VA_ARGS__)
#define __ballot_sync(mask, p) \
  static_cast<unsigned>(::cuemu::warp_op(__FILE__, __LINE__, ::cuemu::WarpKind::kBallot, mask, 0, (p) != 0, 32))
#define __any_sync(mask, p) \
  static_cast<int>(::cuemu::warp_op(__FILE__, __LINE__, ::cuemu::WarpKind::kAny, mask, 0, (p) != 0, 32))
#define __all_sync(mask, p) \
  static_cast<int>(::cuemu::warp_op(__FILE__, __LINE__, ::cuemu::WarpKind::kAll, mask, 0, (p) != 0, 32))
#define __syncwarp(...) ::cuemu::syncwarp_call(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)

namespace cuemu {
template <typename T>
T shfl_call(const char* file, int line, WarpKind kind, unsigned mask, T v, int arg, int width = kWarpSize) {
  return shfl(file, line, kind, mask, v, arg, width);
}
inline void syncwarp_call(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_op(file, line, WarpKind::kSyncwarp, mask, 0, 0, kWarpSize);
}

// Atomics: every access to the word goes through std::atomic_ref, so TSan sees them as atomic.
template <typename T>
T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <typename T>
T atomicSub(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_sub(v);
}
template <typename T>
T atomicExch(T* p, T v) {
  return std::atomic_ref<T>(*p).exchange(v);
}
template <typename T>
T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;
}
template <typename T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomicOr(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_or(v);
}
template <typename T>
T atomicAnd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_and(v);
}
}  // namespace cuemu

namespace cuemu {
// CUDA's device min/max overloads, for arguments of one type.
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline T max(T a, T b) {
  return a < b ? b : a;
}
}  // namespace cuemu

// The kernels' namespace sees the device functions as CUDA code does, unqualified and overloaded for float and
// double (the host's global abs, for one, takes an int).
namespace clfast::cuda {
using std::abs;
using std::ceil;
using std::erf;
using std::exp;
using std::fabs;
using std::floor;
using std::fmax;
using std::fmin;
using std::isinf;
using std::isnan;
using std::log;
using std::pow;
using std::sqrt;
using std::tanh;
using ::cuemu::atomicAdd;
using ::cuemu::atomicAnd;
using ::cuemu::atomicCAS;
using ::cuemu::atomicExch;
using ::cuemu::atomicMax;
using ::cuemu::atomicMin;
using ::cuemu::atomicOr;
using ::cuemu::atomicSub;
using ::cuemu::max;
using ::cuemu::min;
}  // namespace clfast::cuda
