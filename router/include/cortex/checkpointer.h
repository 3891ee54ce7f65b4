// When the live model is checkpointed, and how: every `every` steps of an activation,
// whole for its first and after every kDeltasPerWhole deltas, else a delta of all that
// changed since the last whole one (so a rebuild reads at most two checkpoints). One
// policy for cortexd's trainer and the benchmark that measures `explain`.
#pragma once

#include <atomic>
#include <optional>

#include "cortex/learner.h"

namespace cortex {

class Checkpointer {
 public:
  static constexpr int kDeltasPerWhole = 7;

  explicit Checkpointer(long every) : every_(every) {}
  void set_every(long every) { every_ = every < 1 ? 1 : every; }
  long every() const { return every_.load(); }

  // The live state was rebuilt from the checkpoint at step `from` (0: none) of
  // `activation`, with `chain` deltas under it.
  void Restored(long activation, long from, int chain);
  // After each step: the checkpoint due now, if one is. They fall on the `every` grid
  // whatever the batches were, so `explain` replays the same wherever it runs. `now`: one
  // of the live state as it is, if it took a step since the last (a clean stop: a start
  // with online learning off then restores exactly these weights); the grid stays.
  std::optional<Checkpoint> Take(Learner& learner, bool now = false);
  // Whether the store kept the one Take gave.
  void Saved(const Checkpoint& c, bool ok);

 private:
  std::atomic<long> every_;
  // The rest: one thread's (the caller's).
  long live_ = 0;         // the activation they are of
  long last_step_ = 0;    // its last checkpoint's step (or the grid point of a failed one)
  long whole_step_ = -1;  // its last whole one's, what deltas are on (-1: none)
  int deltas_ = 0;        // since that one
  bool whole_ = false;    // what Take gave
};

}  // namespace cortex
