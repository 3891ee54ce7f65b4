// The task data model shared by the store, router, daemon and wire protocol.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace cortex {

using Tags = std::vector<std::pair<std::string, std::string>>;

enum class TaskState { kQueued, kRouted, kRunning, kSucceeded, kFailed, kCancelled, kInterrupted };
enum class OutcomeKind { kSuccess, kFailure, kTimeout, kCrash, kRejected, kInterrupted };

const char* ToString(TaskState s);
const char* ToString(OutcomeKind k);
std::optional<TaskState> ParseTaskState(const std::string& s);
std::optional<OutcomeKind> ParseOutcomeKind(const std::string& s);
inline bool IsFinal(TaskState s) {
  return s == TaskState::kSucceeded || s == TaskState::kFailed || s == TaskState::kCancelled ||
         s == TaskState::kInterrupted;
}

struct Outcome {
  OutcomeKind kind = OutcomeKind::kFailure;
  double quality = 0;  // [0,1]
  double duration_s = 0;
  std::string output;  // bounded by the executor
  std::string error;   // short reason for a non-success, from the host
};

struct Candidate {
  std::string expert;
  double rule_score = 0;
  double model_score = 0;
  double load_bias = 0;    // selection only; `score` excludes it
  double health_bias = 0;  // selection only: recent crashes, a restarting host
  double score = 0;        // rule_score + model_score
  double confidence = 0;
  std::vector<std::string> rules;  // names of the rules that fired for this expert
  // The manifest prior (cosine of task and manifest) the model scored with: online steps
  // and `explain` reuse it, so a manifest edited later changes neither.
  double prior = 0;
};

struct Decision {
  double time = 0;
  std::string model_version;
  // The exact weights that scored: activation `model_live` (a version made live) after
  // `model_step` online steps. -1: not recorded (a store older than schema 4, a prior).
  long model_step = -1;
  long model_live = 0;
  std::string chosen;
  double propensity = 1;  // probability with which `chosen` was picked
  bool explored = false;
  bool forced = false;
  std::string greedy;                 // the best-scoring expert, whether or not it was chosen
  std::vector<Candidate> candidates;  // best first (by score + load bias)

  const Candidate* Find(const std::string& expert) const {
    for (const auto& c : candidates)
      if (c.expert == expert) return &c;
    return nullptr;
  }
};

struct Attempt {
  int n = 0;  // 1-based
  std::string expert;
  double started_at = 0;
  double finished_at = 0;
  std::optional<Outcome> outcome;  // empty while running
};

struct Feedback {
  double time = 0;
  double quality = 0;
  std::string note;
  std::string by;   // who gave it: a user name, or a token's name
  int attempt = 0;  // the attempt it judged (0: before schema 4)
};

// What a verdict did: the judged attempt and its reward now (the mean of every person's
// latest verdict), and the learning event it made (0: none, the attempt is no training
// data or the reward did not change).
struct FeedbackResult {
  int attempt = 0;
  std::string expert;
  double reward = 0;
  long learn_seq = 0;
};

struct Task {
  std::string id;
  std::string text;
  Tags tags;
  TaskState state = TaskState::kQueued;
  double created_at = 0;
  double updated_at = 0;
  // Not stored: the monotonic clock (Env::MonotonicMicros) when this process stamped
  // created_at; 0 when it did not (read back from the store, another node's).
  int64_t created_mono_us = 0;
  std::string expert;  // the expert whose attempt ended the task
  std::string error;   // why it ended without an attempt saying so (e.g. the poison guard)
  int deaths = 0;      // times cortexd died while routing or running it
  std::optional<Decision> decision;
  std::vector<Attempt> attempts;
  std::vector<Feedback> feedback;
};

struct HistoryQuery {
  int limit = 20;
  std::string expert;  // empty: any
  double since = 0;    // unix time; 0: any
  long after_seq = 0;  // only tasks the store sequenced after this; 0: any
  // "": any; an outcome kind (success, failure, timeout, crash, rejected) matches the
  // last attempt's; cancelled and interrupted match the task's state.
  std::string outcome;
};

struct HistoryRow {
  std::string id;
  long seq = 0;  // the store's own order of tasks (insertion), whatever their clocks said
  double time = 0;
  std::string text;
  std::string state;
  std::string expert;     // whose attempt ended the task (the chosen one until then)
  double confidence = 0;  // the router's confidence in `expert`
  std::string chosen;     // the router's first pick
  double chosen_confidence = 0;
  std::string outcome;  // final outcome kind, empty while unfinished
  double quality = -1;  // effective quality (feedback overrides), -1 if none
  bool explored = false;
};

struct ExpertStats {
  std::string expert;
  long routed = 0;    // decisions that chose it
  long attempts = 0;  // finished attempts it ran
  long successes = 0;
  double mean_quality = 0;  // over finished attempts, feedback overriding
  // Calibration of the router's confidence when it chose this expert, against the
  // outcome of that first attempt.
  long calibrated = 0;
  double mean_confidence = 0;
  double first_success_rate = 0;
  double brier = 0;
};

struct ExpertEvent {
  double time = 0;
  std::string expert;  // may be empty when a file was refused before its name was known
  std::string file;
  std::string event;  // loaded, replaced, removed, refused, configured
  std::string detail;
};

// One candidate of a logged decision as off-policy evaluation reads it: what the live
// model knew when it decided (its score and the prior it scored with) and the rules.
struct LoggedCandidate {
  std::string expert;
  double rule_score = 0;
  double model_score = 0;  // the live model's estimate of the expert's reward, then
  double prior = 0;
};

// One finished attempt as training data: what the router saw, what it chose, how likely
// that choice was, and the reward (feedback overrides the expert's own quality).
struct LoggedOutcome {
  // The store's learning sequence: every finished training attempt and every verdict that
  // changes a reward get the next number as they commit, so one read after another never
  // skips an event that committed late. Online learning consumes events in this order.
  long seq = 0;
  bool feedback = false;  // a person's verdict on the attempt, `reward` as corrected by it
  std::string task_id;
  double time = 0;
  std::string text;
  Tags tags;
  std::string expert;
  int attempt = 1;
  double reward = 0;      // quality of a success, 0 otherwise; feedback overrides
  double prior = 0;       // the manifest prior recorded with the decision for `expert`
  double propensity = 1;  // of the decision (first attempts); 1 for fallbacks
  bool forced = false;
  // The decision's candidates (in attempt order) and its greedy pick, for off-policy
  // evaluation of other policies on the same task.
  std::vector<LoggedCandidate> candidates;
  std::string greedy;
};

// A version made live (promoted, rolled back to, the initial one): its weights then learn
// online from every learning event with seq > after_seq, one step each.
struct Activation {
  long id = 0;
  int version = 0;
  long after_seq = 0;
  double time = 0;
  std::string reason;  // initial, promoted, rollback, migrated
};

// The live weights of an activation after `step` online steps (the last consumed `seq`),
// saved so that rebuilding them (restart, explain) replays only what came after.
struct Checkpoint {
  long activation = 0;
  long step = 0;
  long seq = 0;
  uint64_t rng = 0;  // the replay sampler's state
  std::string weights;
};

// A trained model version. `metrics` is JSON written by the trainer.
struct ModelRecord {
  int version = 0;
  double created = 0;
  std::string status;  // promoted, refused
  bool live = false;
  long trained_through = 0;  // LoggedOutcome::seq of the newest outcome it learned from
  std::string metrics;
  std::string weights;  // empty in listings
  long weights_bytes = 0;
};

// What `cortexctl report` plots, aggregated by the store so that a page over a million
// tasks carries a few thousand numbers. Times are unix seconds; every series has one
// value per bucket of `bucket_s` seconds from `since`.
struct ReportQuery {
  double since = 0;           // 0: from the oldest task
  double until = 0;           // 0: now
  int buckets = 120;          // at most
  int tasks_per_bucket = 25;  // fewer buckets, so each holds about this many (0: exactly)
};

struct ReportData {
  double since = 0, until = 0, bucket_s = 1;
  long tasks = 0;  // created in the window
  // By decision time: decisions, first attempts finished and how many succeeded (the
  // router's own success), and the newest model version that decided (-1: none).
  std::vector<long> decided, first_done, first_ok;
  std::vector<int> model_version;
  // By finish time: tasks finished, how many succeeded (fallbacks included), and their
  // mean and longest latency from submit to finish.
  std::vector<long> finished, succeeded;
  std::vector<double> latency_mean, latency_max;
  // Each expert's decisions per bucket, by name.
  std::vector<std::pair<std::string, std::vector<long>>> share;
  // Reliability: the router's confidence in the expert it chose, in ten equal bins,
  // against that first attempt's outcome.
  struct Calibration {
    std::string expert;
    long n = 0;
    double brier = 0;
    std::vector<long> bin_n;
    std::vector<double> bin_confidence, bin_success;  // means over each bin
  };
  std::vector<Calibration> calibration;
  // Latency distribution of finished tasks: latency_counts[i] took at most
  // latency_edges[i] seconds (and more than the edge before); the last count is the rest.
  std::vector<double> latency_edges;
  std::vector<long> latency_counts;
  // Expert events (loads, refusals, crashes, quarantines, retrains) per kind per bucket,
  // and the newest few.
  std::vector<std::pair<std::string, std::vector<long>>> events;
  std::vector<ExpertEvent> recent_events;
  std::vector<std::pair<std::string, long>> rules;  // rules by decisions they fired in
  std::vector<ModelRecord> models;                  // made in the window, no weights
};

}  // namespace cortex
