#include "runtime/profile.h"

#include <cstdlib>

namespace pyxf {

Profile& profile() {
  static Profile p = [] {
    Profile init;
    const char* env = std::getenv("PYXF_PROFILE");
    init.enabled = env && *env && *env != '0';
    return init;
  }();
  return p;
}

const char* stage_name(Stage s) {
  static const char* names[] = {"embed", "norm", "qkv", "rope", "cache_write", "attention", "attn_out",
                                "ffn_up", "activation", "ffn_down", "head", "sample", "forward",
                                "cross_attention", "encode"};
  return names[(int)s];
}

}  // namespace pyxf
