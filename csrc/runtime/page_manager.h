// Which pages of a KV pool are free, which are in use (reference counted: sequences that share a
// prefix share its pages) and which are cached: full pages no sequence uses any more, kept for the
// token prefix they hold and evicted least recently used first when a page is needed.
//
// A full page is identified by its tokens and the prefix before it: the id of the previous page's
// entry (0 at the start of a sequence). Ids are never reused, so an entry whose parent was evicted
// can no longer be found through a new page that landed in the parent's slot.
#pragma once
#include <cstdint>
#include <list>
#include <unordered_map>
#include <vector>

#include "runtime/kv_cache.h"

namespace pyxf {

class PageManager {
 public:
  // publish()'s answer when a page cannot be cached: neither it nor what follows it is offered.
  static constexpr uint64_t kUncacheable = ~0ull;

  explicit PageManager(int num_pages);

  int num_pages() const { return (int)pages_.size(); }
  // Pages allocate() can still return: free ones and cached ones nobody uses.
  int available() const { return (int)free_.size() + (int)lru_.size(); }
  int used() const { return num_pages() - available(); }
  int cached() const { return (int)lru_.size(); }

  // A page with one reference, or -1 when every page is in use. Evicts the least recently used
  // cached page when no page is free.
  int allocate();
  void release(int page);

  // The cached page that holds `tokens` (kPageTokens of them) after the prefix `parent`, with a
  // reference taken for the caller, and its id (the parent of the next page); -1 when there is none.
  int lookup(uint64_t parent, const int32_t* tokens, uint64_t* id);
  // Offers a full, referenced page for reuse; returns the id that identifies its prefix (the parent
  // of the next page). When an equal entry already exists, that entry's id is returned and `page`
  // stays private (it is freed, not cached, when released); a different entry under the same hash
  // gives kUncacheable.
  uint64_t publish(int page, uint64_t parent, const int32_t* tokens);

 private:
  struct Page {
    int refs = 0;
    uint64_t id = 0;       // entry id while cached or published; 0: private
    uint64_t parent = 0;
    uint64_t hash = 0;
    std::vector<int32_t> tokens;
    std::list<int>::iterator lru;  // position in lru_ while refs == 0 and id != 0
  };
  static uint64_t hash_of(uint64_t parent, const int32_t* tokens);
  bool holds(const Page& p, uint64_t parent, const int32_t* tokens) const;
  void forget(int page);

  std::vector<Page> pages_;
  std::vector<int> free_;                          // ascending ids at the back first
  std::list<int> lru_;                             // cached and unreferenced, oldest first
  std::unordered_map<uint64_t, int> entries_;      // hash -> page
  uint64_t next_id_ = 1;
};

}  // namespace pyxf
