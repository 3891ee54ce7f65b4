#include "cortex/checkpointer.h"

namespace cortex {

void Checkpointer::Restored(long activation, long from, int chain) {
  live_ = activation;
  last_step_ = from;
  deltas_ = chain;
  // The learner's flags hold what changed since `from`: a delta may be on it only if it
  // is whole.
  whole_step_ = from > 0 && chain == 0 ? from : -1;
}

std::optional<Checkpoint> Checkpointer::Take(Learner& learner, bool now) {
  Activation a;
  long step = 0, seq = 0;
  learner.LiveStep(&a, &step, &seq);
  if (a.id != live_) live_ = a.id, last_step_ = 0, whole_step_ = -1;
  const long every = every_.load();
  if (now ? step <= last_step_ : step / every <= last_step_ / every) return std::nullopt;
  whole_ = whole_step_ < 0 || deltas_ >= kDeltasPerWhole;
  Checkpoint c = learner.MakeCheckpoint(a.id, whole_ ? -1 : whole_step_);
  if (c.activation != a.id) {  // a rollback or promotion came in between: start over
    live_ = c.activation, last_step_ = 0, whole_step_ = -1;
    return std::nullopt;
  }
  last_step_ = c.step;
  return c;
}

void Checkpointer::Saved(const Checkpoint& c, bool ok) {
  if (c.activation != live_) return;
  if (!ok) {  // a whole one cleared the flags: the next one, a grid point on, must be whole
    if (whole_) whole_step_ = -1;
    return;
  }
  deltas_ = whole_ ? 0 : deltas_ + 1;
  if (whole_) whole_step_ = c.step;
}

}  // namespace cortex
