// The trainer: cortexd's learning loop, on a thread of its own. It feeds every logged
// outcome to the live model (online steps, in log order, off the task path), retrains a
// candidate when the schedule or a person asks, validates it offline and promotes only a
// better one; `models` and `rollback` read and change which version is live.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "cortex/checkpointer.h"
#include "cortex/env.h"
#include "cortex/learner.h"
#include "cortex/status.h"
#include "cortex/store.h"

namespace cortex {

class Metrics;

class Trainer {
 public:
  // `event` records an entry in the audit's event log (retrains, rollbacks); `stop` is
  // cortexd's: once set, the loop ends and a retrain in progress saves nothing. A retrain
  // is due every `interval_s` once `min_new_outcomes` were logged since the last.
  Trainer(Store* store, std::shared_ptr<Learner> learner, Env* env,
          std::function<void(const std::string& event, const std::string& detail)> event,
          const std::atomic<bool>* stop, double interval_s, long min_new_outcomes,
          Metrics* metrics = nullptr);

  // training.keep_versions (refused versions kept) and training.checkpoint_every (online
  // steps between checkpoints of the live weights). Before Start, or a reload.
  void SetRetention(int keep_versions, long checkpoint_every);
  ~Trainer();

  // The live activation from the store, rebuilt bit for bit: its newest checkpoint (or its
  // version's saved weights) and the same online steps on the learning events after it.
  // A store where no version was ever made live gets the initial one. Before Start, and
  // when another node made a model live.
  Status LoadLiveModel();
  // Rebuilds the weights that made task `t`'s decision and recomputes its candidates.
  Status Explain(const Task& t, nlohmann::json* out);
  void Start();
  void Stop();  // joins the thread (after setting *stop)

  // New outcomes are in the store, or cortexd is stopping. Cheap when called often: only
  // the first call since the trainer last looked wakes it.
  void Wake();
  void SetSchedule(double interval_s, long min_new_outcomes);  // a reload
  // A cluster: retrains run only while `trainer()` says this node holds the role (its
  // name otherwise: a requested retrain says who does), and `live_changed` tells the
  // others of a model made live here. Before Start.
  void SetCluster(std::function<std::string()> trainer, std::function<void(int)> live_changed);
  // Another node made a model live: the trainer thread loads it.
  void ReloadLive();
  // new_outcomes, the schedule, the retrain in progress and the last one's result.
  nlohmann::json Status_();

  // Trains a candidate now. With `wait`, streams its progress lines through `progress`
  // and fills `result` with its metrics; without, only queues the request.
  Status Retrain(bool wait, const std::function<bool(const std::string&)>& progress,
                 nlohmann::json* result);
  Status Models(nlohmann::json* result);
  // Makes model `version` live; one refused at validation only with `force`.
  Status Rollback(int version, bool force, nlohmann::json* result);

 private:
  void Loop();
  void RunRetrain();
  Status RetrainOnce(double now, nlohmann::json* summary);
  // The learning events (`events`) or a retrain's outcomes after `seq`, at most `most`.
  std::vector<LoggedOutcome> Read(bool events, long seq, size_t most = SIZE_MAX);
  // The state of activation `a` at step `step` (SIZE_MAX: every event logged so far).
  // `chain`: how many deltas the checkpoint it started from had below it.
  Result<OnlineState> Rebuild(const Activation& a, long step, long* from_checkpoint, int* chain);
  void MaybeCheckpoint(bool now = false);  // now: see Checkpointer::Take

  Store* const store_;
  const std::shared_ptr<Learner> learner_;
  Env* const env_;
  const std::function<void(const std::string&, const std::string&)> event_;
  Metrics* const metrics_;  // may be null
  const std::atomic<bool>* const stop_;
  std::thread thread_;
  long newest_seq_ = 0;  // newest learning event seen (the loop's thread only)
  static constexpr double kLiveCheckS = 5;
  static constexpr double kStopCatchUpS = 10;  // Stop: the most it spends learning a backlog
  double next_live_check_ = 0;                 // (loop thread)
  std::atomic<int> keep_versions_{20};
  Checkpointer checkpointer_{3000};  // (loop thread; its `every`: any)
  std::atomic<bool> woken_{false};   // a Wake since the loop last read the outcomes
  std::atomic<bool> reload_{false};  // ReloadLive: load the live model from the store
  // A cluster (SetCluster): "" while this node is the trainer, else who is (or "none").
  std::function<std::string()> not_trainer_;
  std::function<void(int)> live_changed_;

  std::mutex explain_mu_;  // one Explain at a time

  std::mutex mu_;  // guards the fields below
  std::condition_variable cv_;
  RetrainSchedule schedule_;
  double interval_s_;
  long min_new_;
  long new_outcomes_ = 0;      // since the last retrain
  long retrain_requests_ = 0;  // asked for by `cortexctl retrain`
  long requests_served_ = 0;   // requests made before a retrain that has since finished
  bool retraining_ = false;
  std::vector<std::string> retrain_log_;  // the current (or last) retrain's progress lines
  long retrain_seq_ = 0;                  // bumped when a retrain starts
  nlohmann::json last_retrain_;
};

}  // namespace cortex
