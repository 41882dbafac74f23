#include "cpu/huge_pages.h"

#include <cstdint>
#include <fstream>
#include <set>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "mlx/transforms.h"

namespace mlx_moe {

namespace {

#if defined(__linux__)
// Not in every libc's headers yet (Linux 6.1).
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

size_t huge_page_bytes() {
  static const size_t bytes = [] {
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size");
    size_t value = 0;
    if (f >> value && value > 0 && (value & (value - 1)) == 0) {
      return value;
    }
    return size_t(2) << 20;
  }();
  return bytes;
}
#endif

} // namespace

HugePageAdvice advise_huge_pages(std::vector<mx::array> arrays) {
  HugePageAdvice advice;
  mx::eval(arrays);
#if defined(__linux__)
  const uintptr_t page = huge_page_bytes();
  std::set<uintptr_t> seen; // buffers already advised
  for (const auto& a : arrays) {
    if (a.nbytes() == 0) {
      continue;
    }
    // The whole buffer the array lives in (a view's own extent can run
    // backwards from its data pointer; the buffer's cannot).
    const auto begin = reinterpret_cast<uintptr_t>(a.buffer().raw_ptr());
    const uintptr_t end = begin + a.buffer_size();
    const uintptr_t first = (begin + page - 1) & ~(page - 1);
    const uintptr_t last = end & ~(page - 1);
    if (last <= first || !seen.insert(begin).second) {
      continue; // no whole huge page inside, or done already
    }
    void* start = reinterpret_cast<void*>(first);
    const size_t length = last - first;
    if (madvise(start, length, MADV_HUGEPAGE) != 0) {
      continue; // e.g. a file mapping, or THP compiled out
    }
    advice.advised += length;
    if (madvise(start, length, MADV_COLLAPSE) == 0) {
      advice.collapsed += length;
    }
  }
#endif
  return advice;
}

} // namespace mlx_moe
