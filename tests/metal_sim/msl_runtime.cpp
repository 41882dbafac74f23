// msl_runtime.cpp: the Metal-on-CPU simulator's runtime.
//
// A launch runs its threadgroups one after another on the calling OS thread.
// Inside a threadgroup every simulated thread is a fiber (its own stack and
// registers); a scheduler switches between them:
//   - threadgroup_barrier: a fiber waits until every live thread of its
//     threadgroup waits at a barrier (at the same call site, else an error);
//   - SIMD collectives and simdgroup_barrier: a fiber waits until no lane of
//     its simdgroup can run; the waiting lanes at the same call site then form
//     the operation's active set (divergent lanes are inactive, as on the GPU);
//   - which runnable fiber runs next: lowest index first, highest first, or
//     seeded random; the random schedule can also switch threads at any
//     access to shared memory (preemption).
// Race detection: the kernel translation unit is compiled with
// -fsanitize=thread, which only inserts calls to __tsan_readN/__tsan_writeN
// before memory accesses; this file implements those hooks itself (libtsan
// is not linked). Accesses to threadgroup memory and to the launch's buffers
// are checked for bounds (redzones) and for conflicting accesses by
// different threads that no barrier orders (see check_access).
#include "msl_abi.h"

#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define MSL_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kSimdWidth = 32;
constexpr uint32_t kMaxThreadsPerThreadgroup = 1024;
constexpr size_t kMaxThreadgroupMemory = 32768;  // Apple GPUs: 32 KiB per threadgroup
constexpr size_t kBufferRedzone = 4096;          // poisoned bytes around each buffer
constexpr size_t kTgGap = 64;                    // poisoned bytes between threadgroup variables
constexpr size_t kDefaultStack = 256 * 1024;
constexpr size_t kMaxDiagnostics = 64;
constexpr unsigned kMemDevice = 1, kMemThreadgroup = 2;

// ------------------------------------------------------------------ fibers
#if defined(__x86_64__)
extern "C" void msl_ctx_switch(void** save_sp, void* new_sp);
extern "C" void msl_fiber_trampoline();
asm(R"(
.text
.globl msl_ctx_switch
.hidden msl_ctx_switch
.type msl_ctx_switch,@function
msl_ctx_switch:
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
.size msl_ctx_switch, .-msl_ctx_switch

.globl msl_fiber_trampoline
.hidden msl_fiber_trampoline
.type msl_fiber_trampoline,@function
msl_fiber_trampoline:
  pushq $0
  movq %r12, %rdi
  callq *%r13
  ud2
.size msl_fiber_trampoline, .-msl_fiber_trampoline
)");
#endif

struct Fiber;
void fiber_main(void* arg);

enum State : uint8_t { RUNNABLE, AT_BARRIER, AT_SIMD, DONE };
enum WaitKind : uint8_t { WAIT_EXCHANGE, WAIT_SG_BARRIER };

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  char* stack_lo = nullptr;  // usable stack (above the guard page)
  size_t stack_size = 0;
  State state = DONE;
  int tid = 0, lane = 0, sg = 0;
  int untracked = 0;
  msl_thread_info info{};
  // what the fiber waits for
  WaitKind wait = WAIT_EXCHANGE;
  unsigned flags = 0;
  const char* file = nullptr;
  unsigned line = 0, col = 0;
  const void* xin = nullptr;
  size_t xn = 0;
  void* xout = nullptr;
  uint32_t* xmask = nullptr;
};

// ------------------------------------------------------ shadow for races
struct Stamp {
  uint32_t tg;      // threadgroup serial (0: never)
  uint32_t epoch;   // threadgroup barrier epoch (for this memory kind)
  uint32_t sepoch;  // simdgroup barrier epoch of the accessing thread's simdgroup
  uint16_t tid;
  uint16_t multi;   // reads: more than one thread read in this epoch
};
struct Cell { Stamp w, r; };

struct Region {
  char* lo = nullptr;  // data
  char* hi = nullptr;
  char* alloc_lo = nullptr;  // data plus redzones
  char* alloc_hi = nullptr;
  bool threadgroup = false;
  int index = 0;  // buffer index
  std::vector<Cell> shadow;
};

struct TgVar { size_t offset, size; std::string name; };

struct Diag { std::string severity, kind, message; uint64_t count; };

struct Kernel { std::string name; void (*thunk)(); };
std::vector<Kernel>& registry() { static std::vector<Kernel> r; return r; }

struct Sim {
  const msl_launch_desc* desc = nullptr;
  void (*thunk)() = nullptr;
  // grid
  uint32_t groups[3]{}, tg_full[3]{}, grid_threads[3]{};
  bool nonuniform = false;
  // buffers
  std::vector<Region> buffers;
  std::vector<void*> buffer_ptrs;
  std::vector<uint64_t> buffer_sizes;
  // threadgroup memory
  char* arena_alloc = nullptr;  // mapping: [redzone][arena][redzone]
  size_t arena_cap = 0;
  Region arena;                  // lo..hi: the whole usable arena
  std::vector<uint8_t> arena_valid;  // 1 where a variable lives
  size_t arena_used = 0, tg_bytes = 0;
  std::vector<void*> tg_ptrs;
  std::vector<uint64_t> tg_sizes;
  std::unordered_map<const void*, TgVar> tg_vars;
  // fibers
  std::vector<Fiber> fibers;
  size_t stack_size = kDefaultStack;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  int n = 0, nsg = 0, ndone = 0;
  std::vector<uint64_t> runnable;  // bitset
  std::vector<int> sg_live;
  uint64_t rng = 0;
  bool aborted = false;
  // race detection
  uint32_t tg_serial = 0;
  uint32_t epoch[2]{};                    // [0] device, [1] threadgroup memory
  std::vector<uint32_t> sg_epoch;         // 2 per simdgroup
  uint32_t cur_tg[3]{};
  // diagnostics
  std::vector<Diag> diags;
  std::unordered_map<std::string, size_t> diag_index;
  uint64_t dropped = 0;
};

Sim S;
Fiber* g_cur = nullptr;
std::mutex g_launch_mutex;

uint64_t next_random() {  // splitmix64
  uint64_t z = (S.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void add_diag(const std::string& severity, const std::string& kind, const std::string& key, const std::string& msg) {
  std::string k = kind + "|" + key;
  auto it = S.diag_index.find(k);
  if (it != S.diag_index.end()) { S.diags[it->second].count++; return; }
  if (S.diags.size() >= kMaxDiagnostics) { S.dropped++; return; }
  S.diag_index.emplace(k, S.diags.size());
  S.diags.push_back({severity, kind, msg, 1});
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string thread_name(int tid) {
  return fmt("thread %d (simdgroup %d lane %d) of threadgroup (%u,%u,%u)", tid, tid / kSimdWidth,
             tid % kSimdWidth, S.cur_tg[0], S.cur_tg[1], S.cur_tg[2]);
}
std::string site_name(const char* file, unsigned line) { return fmt("%s:%u", file ? file : "?", line); }

// "[pc:0x1234]": an offset into the kernel library; the harness turns it
// into file:line with addr2line.
std::string pc_name(void* pc) {
  Dl_info info;
  if (pc && dladdr(pc, &info) && info.dli_fbase)
    return fmt("[pc:0x%lx]", (unsigned long)((char*)pc - (char*)info.dli_fbase));
  return "[pc:?]";
}

// ----------------------------------------------------------- scheduling
void set_runnable(int t, bool on) {
  uint64_t bit = 1ull << (t & 63);
  if (on) S.runnable[t >> 6] |= bit; else S.runnable[t >> 6] &= ~bit;
}

int pick() {
  const int words = (int)S.runnable.size();
  int sched = S.desc->schedule;
  if (sched == MSL_SCHEDULE_FORWARD) {
    for (int w = 0; w < words; ++w)
      if (S.runnable[w]) return w * 64 + __builtin_ctzll(S.runnable[w]);
    return -1;
  }
  if (sched == MSL_SCHEDULE_REVERSE) {
    for (int w = words - 1; w >= 0; --w)
      if (S.runnable[w]) return w * 64 + 63 - __builtin_clzll(S.runnable[w]);
    return -1;
  }
  int count = 0;
  for (int w = 0; w < words; ++w) count += __builtin_popcountll(S.runnable[w]);
  if (!count) return -1;
  int k = (int)(next_random() % (uint64_t)count);
  for (int w = 0; w < words; ++w) {
    uint64_t bits = S.runnable[w];
    int c = __builtin_popcountll(bits);
    if (k >= c) { k -= c; continue; }
    while (k--) bits &= bits - 1;
    return w * 64 + __builtin_ctzll(bits);
  }
  return -1;
}

void switch_to_scheduler(Fiber* f) {
#if defined(__x86_64__)
  msl_ctx_switch(&f->sp, S.sched_sp);
#else
  swapcontext(&f->uc, &S.sched_uc);
#endif
}

void run_fiber(Fiber* f) {
  g_cur = f;
#if defined(__x86_64__)
  msl_ctx_switch(&S.sched_sp, f->sp);
#else
  swapcontext(&S.sched_uc, &f->uc);
#endif
  g_cur = nullptr;
}

void start_fiber(Fiber* f) {
#if defined(__x86_64__)
  uint64_t* s = (uint64_t*)(((uintptr_t)(f->stack_lo + f->stack_size)) & ~(uintptr_t)15);
  *--s = 0;                                 // alignment slot
  *--s = (uint64_t)&msl_fiber_trampoline;   // return address of the first switch
  *--s = 0;                                 // rbp
  *--s = 0;                                 // rbx
  *--s = (uint64_t)f;                       // r12: argument
  *--s = (uint64_t)&fiber_main;             // r13: entry
  *--s = 0;                                 // r14
  *--s = 0;                                 // r15
  uint32_t mxcsr = 0x1f80;
  uint16_t fpucw = 0x037f;
  uint64_t fp = mxcsr | ((uint64_t)fpucw << 32);
  *--s = fp;
  f->sp = s;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack_lo;
  f->uc.uc_stack.ss_size = f->stack_size;
  f->uc.uc_link = nullptr;
  uintptr_t p = (uintptr_t)f;
  makecontext(&f->uc, (void (*)())+[](unsigned lo, unsigned hi) {
    fiber_main((void*)(((uintptr_t)hi << 32) | lo));
  }, 2, (unsigned)(p & 0xffffffffu), (unsigned)(p >> 32));
#endif
}

void fiber_main(void* arg) {
  Fiber* f = (Fiber*)arg;
  S.thunk();
  f->state = DONE;
  S.ndone++;
  S.sg_live[f->sg]--;
  switch_to_scheduler(f);
  __builtin_trap();  // a finished fiber is never resumed
}

void abort_launch(Fiber* f) {
  S.aborted = true;
  if (f) switch_to_scheduler(f);
}

// Completes the collectives of simdgroup `sg` once none of its lanes can run.
bool resolve_simdgroup(int sg) {
  int lo = sg * kSimdWidth, hi = std::min(S.n, lo + kSimdWidth);
  bool waiting = false;
  for (int t = lo; t < hi; ++t) {
    if (S.fibers[t].state == RUNNABLE) return false;
    waiting |= S.fibers[t].state == AT_SIMD;
  }
  if (!waiting) return false;
  // One group per call site: each is an operation with its own active lanes.
  std::vector<int> group;
  for (int t0 = lo; t0 < hi; ++t0) {
    Fiber& a = S.fibers[t0];
    if (a.state != AT_SIMD) continue;
    group.clear();
    uint32_t mask = 0;
    for (int t = t0; t < hi; ++t) {
      Fiber& b = S.fibers[t];
      if (b.state == AT_SIMD && b.wait == a.wait && b.line == a.line && b.col == a.col &&
          (b.file == a.file || (b.file && a.file && !strcmp(b.file, a.file)))) {
        group.push_back(t);
        mask |= 1u << b.lane;
      }
    }
    if (a.wait == WAIT_SG_BARRIER) {
      if (a.flags & kMemDevice) S.sg_epoch[2 * sg + 0]++;
      if (a.flags & kMemThreadgroup) S.sg_epoch[2 * sg + 1]++;
    } else {
      size_t n = a.xn;
      for (int t : group) {
        Fiber& f = S.fibers[t];
        if (f.xn != n) {
          add_diag("error", "simd_divergence", site_name(a.file, a.line),
                   fmt("SIMD collective at %s: lanes pass values of different sizes", site_name(a.file, a.line).c_str()));
          abort_launch(nullptr);
          return true;
        }
        char* out = (char*)f.xout;
        for (int l = 0; l < kSimdWidth; ++l) {
          if (mask >> l & 1u) memcpy(out + l * n, S.fibers[lo + l].xin, n);
          else memset(out + l * n, 0xff, n);
        }
        *f.xmask = mask;
      }
    }
    for (int t : group) { S.fibers[t].state = RUNNABLE; set_runnable(t, true); }
  }
  return true;
}

// All live threads wait at a threadgroup barrier: release them.
bool resolve_barrier() {
  Fiber* first = nullptr;
  for (int t = 0; t < S.n; ++t) {
    Fiber& f = S.fibers[t];
    if (f.state != AT_BARRIER) continue;
    if (!first) { first = &f; continue; }
    if (f.line != first->line || f.col != first->col ||
        (f.file != first->file && (!f.file || !first->file || strcmp(f.file, first->file)))) {
      add_diag("error", "barrier_divergence", site_name(first->file, first->line),
               fmt("threads of threadgroup (%u,%u,%u) wait at different threadgroup_barrier calls: thread %d at %s, "
                   "thread %d at %s",
                   S.cur_tg[0], S.cur_tg[1], S.cur_tg[2], first->tid, site_name(first->file, first->line).c_str(),
                   f.tid, site_name(f.file, f.line).c_str()));
      S.aborted = true;
      return false;
    }
  }
  if (!first) return false;
  if (S.ndone > 0) {
    add_diag(S.desc->strict ? "error" : "warning", "barrier_exit", site_name(first->file, first->line),
             fmt("%d thread(s) of threadgroup (%u,%u,%u) returned while others wait at threadgroup_barrier (%s); "
                 "Metal requires every thread of the threadgroup to reach each barrier",
                 S.ndone, S.cur_tg[0], S.cur_tg[1], S.cur_tg[2], site_name(first->file, first->line).c_str()));
  }
  unsigned flags = first->flags;
  for (int t = 0; t < S.n; ++t) {
    Fiber& f = S.fibers[t];
    if (f.state == AT_BARRIER) { f.state = RUNNABLE; set_runnable(t, true); flags |= f.flags; }
  }
  if (flags & kMemDevice) S.epoch[0]++;
  if (flags & kMemThreadgroup) S.epoch[1]++;
  return true;
}

void run_threadgroup(uint32_t gx, uint32_t gy, uint32_t gz) {
  uint32_t pos[3] = {gx, gy, gz};
  uint32_t dims[3];
  for (int d = 0; d < 3; ++d) {
    dims[d] = S.tg_full[d];
    if (S.nonuniform) dims[d] = std::min(S.tg_full[d], S.grid_threads[d] - pos[d] * S.tg_full[d]);
  }
  S.n = (int)(dims[0] * dims[1] * dims[2]);
  S.nsg = (S.n + kSimdWidth - 1) / kSimdWidth;
  S.ndone = 0;
  memcpy(S.cur_tg, pos, sizeof pos);
  S.runnable.assign((S.n + 63) / 64, 0);
  S.sg_live.assign(S.nsg, 0);
  S.sg_epoch.assign(2 * S.nsg, 1);
  S.epoch[0] = S.epoch[1] = 1;
  S.tg_serial++;
  S.rng = S.desc->seed * 0x9e3779b97f4a7c15ull + S.tg_serial;
  // Threadgroup memory starts as garbage on the GPU: poison it.
  memset(S.arena.lo, 0xff, S.arena_cap);

  for (int t = 0; t < S.n; ++t) {
    Fiber& f = S.fibers[t];
    f.tid = t;
    f.lane = t % kSimdWidth;
    f.sg = t / kSimdWidth;
    f.state = RUNNABLE;
    f.untracked = 0;
    msl_thread_info& I = f.info;
    uint32_t local[3] = {t % dims[0], (t / dims[0]) % dims[1], t / (dims[0] * dims[1])};
    for (int d = 0; d < 3; ++d) {
      I.thread_position_in_threadgroup[d] = local[d];
      I.threadgroup_position_in_grid[d] = pos[d];
      I.threads_per_threadgroup[d] = dims[d];
      I.threadgroups_per_grid[d] = S.groups[d];
      I.threads_per_grid[d] = S.nonuniform ? S.grid_threads[d] : S.groups[d] * S.tg_full[d];
      I.thread_position_in_grid[d] = pos[d] * S.tg_full[d] + local[d];
    }
    I.thread_index_in_threadgroup = t;
    I.thread_index_in_simdgroup = f.lane;
    I.simdgroup_index_in_threadgroup = f.sg;
    I.simdgroups_per_threadgroup = S.nsg;
    I.threads_per_simdgroup = kSimdWidth;
    I.nbuffers = (int)S.buffer_ptrs.size();
    I.buffers = S.buffer_ptrs.data();
    I.buffer_sizes = S.buffer_sizes.data();
    I.ntg = (int)S.tg_ptrs.size();
    I.tg_buffers = S.tg_ptrs.data();
    I.tg_sizes = S.tg_sizes.data();
    S.sg_live[f.sg]++;
    start_fiber(&f);
    set_runnable(t, true);
  }

  while (!S.aborted) {
    int t = pick();
    if (t >= 0) {
      Fiber* f = &S.fibers[t];
      run_fiber(f);
      if (f->state != RUNNABLE) {
        set_runnable(t, false);
        resolve_simdgroup(f->sg);
      }
      continue;
    }
    if (S.ndone == S.n) break;
    bool progress = false;
    for (int sg = 0; sg < S.nsg && !S.aborted; ++sg) progress |= resolve_simdgroup(sg);
    if (progress) continue;
    if (!resolve_barrier()) {
      if (!S.aborted)
        add_diag("error", "deadlock", "deadlock", fmt("threadgroup (%u,%u,%u): no thread can proceed", pos[0], pos[1], pos[2]));
      S.aborted = true;
    }
  }
}

// ----------------------------------------------------- access checking
Region* find_region(const char* a) {
  if (a >= S.arena.alloc_lo && a < S.arena.alloc_hi) return &S.arena;
  for (Region& r : S.buffers)
    if (a >= r.alloc_lo && a < r.alloc_hi) return &r;
  return nullptr;
}

std::string where(const Region& r, const char* a) {
  if (r.threadgroup) {
    size_t off = (size_t)(a - r.lo);
    for (auto& kv : S.tg_vars) {
      const TgVar& v = kv.second;
      if (off >= v.offset && off < v.offset + v.size)
        return fmt("threadgroup variable '%s' byte %zu", v.name.c_str(), off - v.offset);
    }
    return fmt("threadgroup memory byte %zu (outside every threadgroup variable)", off);
  }
  return fmt("buffer(%d) byte %ld (size %zu)", r.index, (long)(a - r.lo), (size_t)(r.hi - r.lo));
}

bool ordered(const Stamp& p, const Fiber* f, int kind) {
  if (p.tid == f->tid) return true;
  if (p.epoch < S.epoch[kind]) return true;
  if (p.tid / kSimdWidth == f->sg && p.sepoch < S.sg_epoch[2 * f->sg + kind]) return true;
  return false;
}

void race(const char* what, const Region& r, const char* a, const Stamp& p, const Fiber* f, void* pc, bool cross_tg) {
  std::string other = cross_tg ? std::string("another threadgroup") : thread_name(p.tid);
  const char* fix = cross_tg ? "threadgroups of one dispatch are not ordered"
                             : (r.threadgroup ? "missing threadgroup_barrier(mem_flags::mem_threadgroup)?"
                                              : "missing threadgroup_barrier(mem_flags::mem_device)?");
  add_diag("error", "race", std::string(what) + pc_name(pc),
           fmt("data race (%s) on %s: %s %s, unordered with %s; %s", what, where(r, a).c_str(),
               thread_name(f->tid).c_str(), pc_name(pc).c_str(), other.c_str(), fix));
}

void check_access(void* addr, size_t size, bool write, void* pc) {
  Fiber* f = g_cur;
  if (!f || f->untracked || S.aborted) return;
  char* a = (char*)addr;
  Region* r = find_region(a);
  if (!r) return;
  if (S.desc->schedule == MSL_SCHEDULE_RANDOM && S.desc->preempt > 0 &&
      (double)(next_random() >> 11) * 0x1p-53 < S.desc->preempt) {
    switch_to_scheduler(f);  // stays runnable: another thread may run first
    if (S.aborted) return;
  }
  bool oob = a < r->lo || a + size > r->hi;
  if (!oob && r->threadgroup)
    for (size_t i = 0; i < size; ++i) oob |= !S.arena_valid[(size_t)(a - r->lo) + i];
  if (oob) {
    add_diag("error", "out_of_bounds", std::string(write ? "w" : "r") + pc_name(pc),
             fmt("out-of-bounds %s of %zu bytes at %s by %s %s", write ? "write" : "read", size, where(*r, a).c_str(),
                 thread_name(f->tid).c_str(), pc_name(pc).c_str()));
    return;
  }
  if (!S.desc->race_check) return;
  const int kind = r->threadgroup ? 1 : 0;
  Stamp now{S.tg_serial, S.epoch[kind], S.sg_epoch[2 * f->sg + kind], (uint16_t)f->tid, 0};
  for (size_t i = 0; i < size; ++i) {
    Cell& c = r->shadow[(size_t)(a - r->lo) + i];
    // conflicts with the last write
    if (c.w.tg == S.tg_serial) {
      if (!ordered(c.w, f, kind)) { race(write ? "write after write" : "read after write", *r, a + i, c.w, f, pc, false); break; }
    } else if (c.w.tg != 0 && !r->threadgroup) {
      race(write ? "write after write" : "read after write", *r, a + i, c.w, f, pc, true);
      break;
    } else if (!write && r->threadgroup) {
      add_diag("warning", "uninitialized", pc_name(pc),
               fmt("read of threadgroup memory not written by this threadgroup: %s by %s %s", where(*r, a + i).c_str(),
                   thread_name(f->tid).c_str(), pc_name(pc).c_str()));
      break;
    }
    if (write) {
      // conflicts with reads since
      if (c.r.tg == S.tg_serial) {
        bool others = c.r.tid != f->tid || c.r.multi;
        Stamp rr = c.r;
        if (c.r.multi) rr.tid = (uint16_t)~0u;
        if (others && !ordered(rr, f, kind)) { race("write after read", *r, a + i, c.r, f, pc, false); break; }
      } else if (c.r.tg != 0 && !r->threadgroup) {
        race("write after read", *r, a + i, c.r, f, pc, true);
        break;
      }
    }
  }
  for (size_t i = 0; i < size; ++i) {
    Cell& c = r->shadow[(size_t)(a - r->lo) + i];
    if (write) {
      c.w = now;
    } else if (c.r.tg == now.tg && c.r.epoch == now.epoch && c.r.tid != now.tid) {
      c.r.multi = 1;
    } else {
      c.r = now;
    }
  }
}

// ------------------------------------------------------------- memory
char* map_with_redzones(size_t size, size_t redzone, char** data) {
  size_t total = size + 2 * redzone;
  char* m = (char*)malloc(total);
  if (!m) return nullptr;
  memset(m, 0xff, total);
  *data = m + redzone;
  return m;
}

bool ensure_stacks(int n, size_t stack_size) {
  long page = sysconf(_SC_PAGESIZE);
  stack_size = (stack_size + page - 1) / page * page;
  if ((int)S.fibers.size() >= n && S.stack_size == stack_size) return true;
  for (Fiber& f : S.fibers)
    if (f.stack_lo) munmap(f.stack_lo - page, f.stack_size + page);
  S.fibers.assign(n, Fiber{});
  S.stack_size = stack_size;
  for (Fiber& f : S.fibers) {
    char* m = (char*)mmap(nullptr, stack_size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return false;
    mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults
    f.stack_lo = m + page;
    f.stack_size = stack_size;
  }
  return true;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') { o += '\\'; o += c; }
    else if ((unsigned char)c < 0x20) o += fmt("\\u%04x", c);
    else o += c;
  }
  return o;
}

void write_diags(char* out, size_t cap) {
  if (!out || !cap) return;
  std::string j = "[";
  for (size_t i = 0; i < S.diags.size(); ++i) {
    const Diag& d = S.diags[i];
    j += fmt("%s{\"severity\":\"%s\",\"kind\":\"%s\",\"count\":%llu,\"message\":\"", i ? "," : "", d.severity.c_str(),
             d.kind.c_str(), (unsigned long long)d.count);
    j += json_escape(d.message) + "\"}";
  }
  if (S.dropped)
    j += fmt("%s{\"severity\":\"warning\",\"kind\":\"dropped\",\"count\":%llu,\"message\":\"more diagnostics dropped\"}",
             S.diags.empty() ? "" : ",", (unsigned long long)S.dropped);
  j += "]";
  if (j.size() + 1 > cap) j = "[{\"severity\":\"error\",\"kind\":\"internal\",\"count\":1,\"message\":\"diagnostics too long\"}]";
  memcpy(out, j.c_str(), std::min(cap, j.size() + 1));
}

int launch(const msl_launch_desc* d) {
  S.desc = d;
  S.thunk = nullptr;
  for (const Kernel& k : registry())
    if (k.name == d->kernel) S.thunk = k.thunk;
  if (!S.thunk) { add_diag("error", "launch", "nokernel", fmt("no kernel named '%s'", d->kernel)); return -1; }

  S.nonuniform = d->grid_threads[0] && d->grid_threads[1] && d->grid_threads[2];
  uint64_t threads = 1;
  for (int i = 0; i < 3; ++i) {
    S.tg_full[i] = d->threads[i];
    threads *= d->threads[i];
    if (S.nonuniform) {
      S.grid_threads[i] = d->grid_threads[i];
      S.groups[i] = d->threads[i] ? (d->grid_threads[i] + d->threads[i] - 1) / d->threads[i] : 0;
    } else {
      S.groups[i] = d->threadgroups[i];
    }
  }
  if (threads == 0 || threads > kMaxThreadsPerThreadgroup) {
    add_diag("error", "launch", "threads", fmt("threads per threadgroup must be 1..%u, got %llu", kMaxThreadsPerThreadgroup,
                                               (unsigned long long)threads));
    return -1;
  }
  if (!ensure_stacks((int)threads, d->stack_size ? d->stack_size : kDefaultStack)) {
    add_diag("error", "launch", "stacks", "cannot allocate fiber stacks");
    return -1;
  }

  // buffers: private copies between poisoned redzones
  std::vector<char*> allocations;
  S.buffers.assign(d->nbuffers, Region{});
  S.buffer_ptrs.assign(d->nbuffers, nullptr);
  S.buffer_sizes.assign(d->nbuffers, 0);
  for (int i = 0; i < d->nbuffers; ++i) {
    Region& r = S.buffers[i];
    char* data = nullptr;
    char* m = map_with_redzones(d->buffer_sizes[i], kBufferRedzone, &data);
    if (!m) { add_diag("error", "launch", "oom", "out of memory"); return -1; }
    allocations.push_back(m);
    if (d->buffers[i] && d->buffer_sizes[i]) memcpy(data, d->buffers[i], d->buffer_sizes[i]);
    r.lo = data;
    r.hi = data + d->buffer_sizes[i];
    r.alloc_lo = m;
    r.alloc_hi = r.hi + kBufferRedzone;
    r.index = i;
    if (d->race_check) r.shadow.assign(d->buffer_sizes[i], Cell{});
    S.buffer_ptrs[i] = data;
    S.buffer_sizes[i] = d->buffer_sizes[i];
  }

  // threadgroup memory: dynamic [[threadgroup(i)]] first, then the kernel's
  // threadgroup variables as threads first declare them.
  S.arena_cap = 2 * kMaxThreadgroupMemory;
  char* arena_data = nullptr;
  char* arena_mem = map_with_redzones(S.arena_cap, kBufferRedzone, &arena_data);
  if (!arena_mem) { add_diag("error", "launch", "oom", "out of memory"); return -1; }
  allocations.push_back(arena_mem);
  S.arena = Region{};
  S.arena.lo = arena_data;
  S.arena.hi = arena_data + S.arena_cap;
  S.arena.alloc_lo = arena_mem;
  S.arena.alloc_hi = S.arena.hi + kBufferRedzone;
  S.arena.threadgroup = true;
  if (d->race_check) S.arena.shadow.assign(S.arena_cap, Cell{});
  S.arena_valid.assign(S.arena_cap, 0);
  S.arena_used = 0;
  S.tg_bytes = 0;
  S.tg_vars.clear();
  S.tg_ptrs.assign(d->ntg, nullptr);
  S.tg_sizes.assign(d->ntg, 0);
  for (int i = 0; i < d->ntg; ++i) {
    if (d->tg_sizes[i] % 16) {
      add_diag("error", "launch", "tgsize", fmt("threadgroup memory length %d (%llu bytes) is not a multiple of 16", i,
                                                (unsigned long long)d->tg_sizes[i]));
    }
    S.tg_ptrs[i] = S.arena.lo + S.arena_used;
    S.tg_sizes[i] = d->tg_sizes[i];
    S.tg_vars[(const void*)(uintptr_t)(i + 1)] = TgVar{S.arena_used, d->tg_sizes[i], fmt("[[threadgroup(%d)]]", i)};
    memset(&S.arena_valid[S.arena_used], 1, d->tg_sizes[i]);
    S.tg_bytes += d->tg_sizes[i];
    S.arena_used += (d->tg_sizes[i] + 15) / 16 * 16 + kTgGap;
  }
  if (S.tg_bytes > kMaxThreadgroupMemory)
    add_diag("error", "threadgroup_memory", "limit", fmt("threadgroup memory %zu bytes exceeds 32 KiB", S.tg_bytes));

  S.aborted = false;
  S.tg_serial = 0;
  for (uint32_t z = 0; z < S.groups[2] && !S.aborted; ++z)
    for (uint32_t y = 0; y < S.groups[1] && !S.aborted; ++y)
      for (uint32_t x = 0; x < S.groups[0] && !S.aborted; ++x) run_threadgroup(x, y, z);

  // redzones: catch out-of-bounds writes even without instrumentation
  for (Region& r : S.buffers) {
    for (char* p = r.alloc_lo; p < r.alloc_hi; ++p) {
      if (p == r.lo) p = r.hi;
      if (p >= r.alloc_hi) break;
      if ((unsigned char)*p != 0xff) {
        add_diag("error", "out_of_bounds", fmt("redzone%d", r.index),
                 fmt("buffer(%d): bytes outside the buffer were overwritten (byte %ld)", r.index, (long)(p - r.lo)));
        break;
      }
    }
  }
  for (int i = 0; i < d->nbuffers; ++i) {
    if (d->buffers[i] && d->buffer_sizes[i]) memcpy(d->buffers[i], S.buffers[i].lo, d->buffer_sizes[i]);
  }
  for (char* m : allocations) free(m);
  S.buffers.clear();
  S.arena = Region{};
  return 0;
}

}  // namespace

// -------------------------------------------------- runtime ABI (kernels)
extern "C" {
const msl_thread_info* msl_rt_thread_info() {
  static msl_thread_info none{};
  return g_cur ? &g_cur->info : &none;
}

void msl_rt_barrier(int scope, unsigned flags, const char* file, unsigned line, unsigned col) {
  Fiber* f = g_cur;
  if (!f) return;
  f->wait = WAIT_SG_BARRIER;
  f->flags = flags;
  f->file = file;
  f->line = line;
  f->col = col;
  f->state = scope == 0 ? AT_BARRIER : AT_SIMD;
  switch_to_scheduler(f);
}

void msl_rt_simd_exchange(const void* mine, size_t n, void* all, uint32_t* mask, const char* file, unsigned line,
                          unsigned col) {
  Fiber* f = g_cur;
  if (!f) return;
  f->wait = WAIT_EXCHANGE;
  f->xin = mine;
  f->xn = n;
  f->xout = all;
  f->xmask = mask;
  f->file = file;
  f->line = line;
  f->col = col;
  f->state = AT_SIMD;
  f->untracked++;  // the runtime's copies are not the kernel's accesses
  switch_to_scheduler(f);
  f->untracked--;
}

void* msl_rt_tg_alloc(const void* key, const char* name, size_t size, size_t align) {
  auto it = S.tg_vars.find(key);
  if (it != S.tg_vars.end()) return S.arena.lo + it->second.offset;
  size_t off = (S.arena_used + align - 1) / align * align;
  S.tg_bytes += size;
  if (S.tg_bytes > kMaxThreadgroupMemory || off + size > S.arena_cap) {
    add_diag("error", "threadgroup_memory", "limit",
             fmt("threadgroup memory exceeds 32 KiB (adding '%s', %zu bytes)", name, size));
    abort_launch(g_cur);
    return S.arena.lo;
  }
  S.tg_vars[key] = TgVar{off, size, name};
  memset(&S.arena_valid[off], 1, size);
  S.arena_used = off + size + kTgGap;
  return S.arena.lo + off;
}

void msl_rt_untracked(int on) {
  if (g_cur) g_cur->untracked += on ? 1 : -1;
}

void msl_rt_error(const char* kind, const char* message) {
  std::string msg = message;
  if (g_cur) msg += " (" + thread_name(g_cur->tid) + ")";
  add_diag("error", kind, message, msg);
}

void msl_rt_fatal(const char* kind, const char* message) {
  msl_rt_error(kind, message);
  abort_launch(g_cur);
}

void msl_rt_register_kernel(const char* name, void (*thunk)()) { registry().push_back({name, thunk}); }

// ----------------------------------------------- compiler instrumentation
#define MSL_HOOK(n)                                                                                             \
  void __tsan_read##n(void* a) { check_access(a, n, false, __builtin_return_address(0)); }                      \
  void __tsan_write##n(void* a) { check_access(a, n, true, __builtin_return_address(0)); }                      \
  void __tsan_unaligned_read##n(void* a) { check_access(a, n, false, __builtin_return_address(0)); }            \
  void __tsan_unaligned_write##n(void* a) { check_access(a, n, true, __builtin_return_address(0)); }            \
  void __tsan_volatile_read##n(void* a) { check_access(a, n, false, __builtin_return_address(0)); }             \
  void __tsan_volatile_write##n(void* a) { check_access(a, n, true, __builtin_return_address(0)); }
MSL_HOOK(1)
MSL_HOOK(2)
MSL_HOOK(4)
MSL_HOOK(8)
MSL_HOOK(16)
#undef MSL_HOOK
void __tsan_read_range(void* a, unsigned long n) { check_access(a, n, false, __builtin_return_address(0)); }
void __tsan_write_range(void* a, unsigned long n) { check_access(a, n, true, __builtin_return_address(0)); }
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
}

// ------------------------------------------------------ host API (ctypes)
MSL_EXPORT int msl_sim_kernel_count() { return (int)registry().size(); }
MSL_EXPORT const char* msl_sim_kernel_name(int i) {
  return i >= 0 && i < (int)registry().size() ? registry()[i].name.c_str() : nullptr;
}
MSL_EXPORT int msl_sim_launch(const msl_launch_desc* desc, char* diag, size_t diag_cap) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  S.diags.clear();
  S.diag_index.clear();
  S.dropped = 0;
  int rc = launch(desc);
  write_diags(diag, diag_cap);
  if (rc < 0) return -1;
  int errors = 0;
  for (const Diag& d : S.diags) errors += d.severity == "error";
  return errors;
}
