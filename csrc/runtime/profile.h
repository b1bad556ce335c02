// Optional wall-clock accounting per stage of the forward pass (PYXF_PROFILE=1 or
// _core.set_profiling(True)): where a token's time goes, kernels versus everything else.
#pragma once
#include <chrono>

namespace pyxf {

enum class Stage : int { kEmbed, kNorm, kQkv, kRope, kCacheWrite, kAttention, kAttnOut, kFfnUp,
                         kActivation, kFfnDown, kHead, kSample, kForward, kCrossAttention, kEncode, kCount };

// Stages are counted apart for prompts and for decode steps, so that a decode step's figures are
// not averaged with a prompt's: a forward pass is a decode step when every sequence in it feeds one
// token, a prefill otherwise (prompts, chunks, encoders). The phase is that of the last forward pass
// begun; the stages after it (sampling) count with it.
enum class Phase : int { kPrefill = 0, kDecode = 1, kCount };

struct Profile {
  bool enabled = false;
  Phase phase = Phase::kPrefill;
  double seconds[(int)Phase::kCount][(int)Stage::kCount] = {};
  long calls[(int)Phase::kCount][(int)Stage::kCount] = {};
  void reset() {
    for (int p = 0; p < (int)Phase::kCount; ++p)
      for (int i = 0; i < (int)Stage::kCount; ++i) seconds[p][i] = 0, calls[p][i] = 0;
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
    Profile& p = profile();
    p.seconds[(int)p.phase][(int)stage_] += dt;
    p.calls[(int)p.phase][(int)stage_] += 1;
  }

 private:
  Stage stage_;
  bool on_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace pyxf
