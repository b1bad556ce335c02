// Optional wall-clock accounting per stage of the forward pass (PYXF_PROFILE=1 or
// _core.set_profiling(True)): where a token's time goes, kernels versus everything else.
#pragma once
#include <chrono>

namespace pyxf {

enum class Stage : int { kEmbed, kNorm, kQkv, kRope, kCacheWrite, kAttention, kAttnOut, kFfnUp,
                         kActivation, kFfnDown, kHead, kSample, kForward, kCrossAttention, kEncode, kCount };

struct Profile {
  bool enabled = false;
  double seconds[(int)Stage::kCount] = {};
  long calls[(int)Stage::kCount] = {};
  void reset() {
    for (int i = 0; i < (int)Stage::kCount; ++i) seconds[i] = 0, calls[i] = 0;
  }
};

Profile& profile();
const char* stage_name(Stage s);

// Adds the lifetime of the scope to a stage, when profiling is on.
class StageTimer {
 public:
  explicit StageTimer(Stage s) : stage_(s), on_(profile().enabled) {
    if (on_) start_ = std::chrono::steady_clock::now();
  }
  ~StageTimer() {
    if (!on_) return;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    profile().seconds[(int)stage_] += dt;
    profile().calls[(int)stage_] += 1;
  }

 private:
  Stage stage_;
  bool on_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace pyxf
