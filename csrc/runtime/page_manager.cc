#include "runtime/page_manager.h"

#include <algorithm>
#include <cstring>

namespace pyxf {

PageManager::PageManager(int num_pages) : pages_(num_pages) {
  // Low page ids are handed out first: a pool's memory is touched from its start as it fills.
  free_.reserve(num_pages);
  for (int p = num_pages - 1; p >= 0; --p) free_.push_back(p);
}

int PageManager::allocate() {
  int page;
  if (!free_.empty()) {
    page = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    page = lru_.front();
    lru_.pop_front();
    forget(page);
  } else {
    return -1;
  }
  pages_[page].refs = 1;
  return page;
}

void PageManager::release(int page) {
  Page& p = pages_[page];
  if (--p.refs > 0) return;
  if (p.id != 0) {
    p.lru = lru_.insert(lru_.end(), page);
  } else {
    free_.push_back(page);
  }
}

uint64_t PageManager::hash_of(uint64_t parent, const int32_t* tokens) {
  // FNV-1a over the parent id and the tokens; equality is checked on the tokens themselves.
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](uint64_t v) {
    for (int i = 0; i < 8; ++i, v >>= 8) h = (h ^ (v & 0xff)) * 1099511628211ull;
  };
  mix(parent);
  for (int i = 0; i < kPageTokens; ++i) mix((uint32_t)tokens[i]);
  return h;
}

bool PageManager::holds(const Page& p, uint64_t parent, const int32_t* tokens) const {
  return p.parent == parent && std::memcmp(p.tokens.data(), tokens, kPageTokens * sizeof(int32_t)) == 0;
}

int PageManager::lookup(uint64_t parent, const int32_t* tokens, uint64_t* id) {
  const auto it = entries_.find(hash_of(parent, tokens));
  if (it == entries_.end() || !holds(pages_[it->second], parent, tokens)) return -1;
  const int page = it->second;
  Page& p = pages_[page];
  if (p.refs++ == 0) lru_.erase(p.lru);
  *id = p.id;
  return page;
}

uint64_t PageManager::publish(int page, uint64_t parent, const int32_t* tokens) {
  const uint64_t h = hash_of(parent, tokens);
  const auto it = entries_.find(h);
  if (it != entries_.end()) {
    // An equal page is already cached: its id stands for this prefix too. A different page with
    // the same hash keeps its slot; this one stays private and its successors are not cached.
    const Page& other = pages_[it->second];
    return holds(other, parent, tokens) ? other.id : kUncacheable;
  }
  Page& p = pages_[page];
  p.id = next_id_++;
  p.parent = parent;
  p.hash = h;
  p.tokens.assign(tokens, tokens + kPageTokens);
  entries_.emplace(h, page);
  return p.id;
}

void PageManager::forget(int page) {
  Page& p = pages_[page];
  entries_.erase(p.hash);
  p.id = 0;
  p.parent = 0;
  p.tokens.clear();
}

}  // namespace pyxf
