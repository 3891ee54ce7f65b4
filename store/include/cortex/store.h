// The audit store: tasks, decisions, attempts, feedback and expert events, behind one
// interface with two implementations: SQLite (WAL; ":memory:" for tests), the embedded
// default, and PostgreSQL (store.url). The same test suite runs against both.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cortex/status.h"
#include "cortex/types.h"

namespace cortex {

class Store {
 public:
  virtual ~Store() = default;

  // Every write is durable when it returns OK (it survives a kill -9 of the process).
  // Concurrent writes may share one commit; each still gets its own status.
  virtual Status InsertTask(const Task& task) = 0;
  // Records the decision and moves the task to `routed`.
  Status RecordDecision(const std::string& id, const Decision& d) {
    std::vector<Status> st;
    RecordDecisions({{id, &d}}, &st);
    return st[0];
  }
  // The same for a batch (one commit, usually): each task's status in `out`, in order.
  virtual void RecordDecisions(const std::vector<std::pair<std::string, const Decision*>>& batch,
                               std::vector<Status>* out) = 0;
  // New tasks with what was decided before they were acknowledged, one write each (one
  // commit for the batch, usually): the task, its decision when routed (it is `routed`),
  // and its first attempt when `started` names the expert already running it (`running`).
  // Each task's status in `out`, in order. A write that is not `durable` returns once
  // it is committed and in the kernel, without waiting for the disk: nobody may be told
  // of it before a later durable commit (or Sync) has reached the disk, which covers it.
  struct Admission {
    const Task* task = nullptr;
    const Decision* decision = nullptr;
    std::string started;
    bool durable = true;
  };
  virtual void Admit(const std::vector<Admission>& batch, std::vector<Status>* out) = 0;
  Status StartAttempt(const std::string& id, int n, const std::string& expert, double time) {
    std::vector<Status> st;
    StartAttempts({{id, n, expert, time}}, &st);
    return st[0];
  }
  // The same for a batch, in one commit; each attempt's status in `out`, in order.
  struct AttemptStart {
    std::string id;
    int n = 0;
    std::string expert;
    double time = 0;
  };
  virtual void StartAttempts(const std::vector<AttemptStart>& batch, std::vector<Status>* out) = 0;
  // With `ends` set, the task ends in that state in the same commit (as FinishTask, the
  // attempt's expert named as the one that ended it); without, a running task is routed
  // again: it waits for its next attempt (and a restart resumes it there).
  Status FinishAttempt(const std::string& id, int n, const Outcome& o, double time,
                       std::optional<TaskState> ends = std::nullopt) {
    std::vector<Status> st;
    FinishAttempts({{id, n, &o, time, ends}}, &st);
    return st[0];
  }
  // The same for a batch, in one commit; each attempt's status in `out`, in order.
  struct AttemptEnd {
    std::string id;
    int n = 0;
    const Outcome* outcome = nullptr;
    double time = 0;
    std::optional<TaskState> ends;
  };
  virtual void FinishAttempts(const std::vector<AttemptEnd>& batch, std::vector<Status>* out) = 0;
  // Takes back attempt n, recorded but never begun (cortexd stopped first): the attempt
  // is removed and the task is `routed` again, to run at the next start.
  virtual Status UndoStart(const std::string& id, int n) = 0;
  // Sets the task's final state and the expert whose attempt ended it.
  virtual Status FinishTask(const std::string& id, TaskState state, const std::string& expert,
                            double time) = 0;
  virtual Status SetState(const std::string& id, TaskState state, double time) = 0;
  // A person's verdict (f.by) on the task's last finished attempt, in one transaction: the
  // attempt's reward becomes the mean of every person's latest verdict on it, and a change
  // of that reward on a training attempt is a learning event (see LoggedOutcome::seq).
  // NotFound for an unknown id; FailedPrecondition when the task never finished an
  // attempt; ResourceExhausted when f.by gave `per_hour` verdicts in the hour before
  // f.time (per_hour <= 0: no bound).
  virtual Status AddFeedback(const std::string& id, const Feedback& f, int per_hour,
                             FeedbackResult* out) = 0;

  virtual Status GetTask(const std::string& id, Task* task) = 0;
  // The one task whose id starts with `prefix` (an exact id always wins): NotFound when
  // none does, InvalidArgument naming some when several do.
  virtual Status ResolveTaskId(const std::string& prefix, std::string* id) = 0;
  virtual Status History(const HistoryQuery& q, std::vector<HistoryRow>* rows) = 0;
  virtual Status Stats(std::vector<ExpertStats>* stats) = 0;
  virtual Status RecordExpertEvent(const ExpertEvent& e) = 0;
  virtual Status ExpertEvents(int limit, std::vector<ExpertEvent>* events) = 0;
  // Tasks created at or after `since`, oldest first, in pages; `fn` returns false to stop.
  virtual Status ForEachTask(double since, const std::function<bool(const Task&)>& fn) = 0;

  // The learning events with seq > `after_seq` in seq order, as online learning consumes
  // them: finished training attempts (each with the reward it had when it finished) and
  // verdicts (the reward they made). `fn` returns false to stop. Interrupted attempts and
  // crashes are left out: a crash is a health signal for routing, not evidence that the
  // task belonged elsewhere.
  virtual Status ForEachLearnEvent(long after_seq,
                                   const std::function<bool(const LoggedOutcome&)>& fn) = 0;
  // The same events with after_seq < seq <= last_seq, oldest first, for rebuilding weights;
  // with `newest` > 0, only the newest `newest` of them.
  virtual Status LearnEvents(long after_seq, long last_seq, long newest,
                             std::vector<LoggedOutcome>* out) = 0;
  // The finished training attempts among the learning events with seq > `after_seq`, in
  // seq order, each once and with its reward as of now (verdicts applied): a retrain's data.
  virtual Status ForEachOutcome(long after_seq,
                                const std::function<bool(const LoggedOutcome&)>& fn) = 0;
  // The seq just before the `n` newest training outcomes (0 if there are fewer), so a
  // retrain can read only the window it learns from.
  virtual Status OutcomeWindowStart(long n, long* after_seq) = 0;
  // The newest learning event's seq, and the newest finished training attempt's (0: none).
  virtual Status NewestLearnSeq(long* any, long* outcome) = 0;
  // Model versions: saved once, listed without weights, one of them live.
  // With m.live, the version is also made live, in the same transaction: an activation
  // learning online after m.trained_through (its id in *activation, when not null).
  virtual Status SaveModel(const ModelRecord& m, long* activation = nullptr) = 0;
  // Makes `version` live (0: the untrained model) from learning event `after_seq` on: a new
  // activation, its id in *activation. NotFound for an unknown version.
  virtual Status SetLiveModel(int version, long after_seq, const std::string& reason, double time,
                              long* activation) = 0;
  virtual Status ListModels(std::vector<ModelRecord>* out) = 0;
  virtual Status LoadModel(int version, ModelRecord* m) = 0;
  // The newest activation (NotFound when none was ever made), or the one with id `id`.
  virtual Status LiveActivation(Activation* out) = 0;
  virtual Status GetActivation(long id, Activation* out) = 0;
  // Checkpoints of an activation's online learning; saving one that exists is a no-op (any
  // node may save the same, bit for bit). LoadCheckpoint: the one with the greatest step
  // <= max_step (NotFound when none).
  virtual Status SaveCheckpoint(const Checkpoint& c) = 0;
  virtual Status LoadCheckpoint(long activation, long max_step, Checkpoint* out) = 0;
  // Deletes refused versions that never were live, all but the newest `keep`; their
  // numbers in *deleted.
  virtual Status PruneModels(int keep, std::vector<int>* deleted) = 0;

  // Marks tasks as being routed now: if cortexd dies before their decisions are recorded,
  // the next start counts that death against each of them (see Recover).
  virtual Status MarkRouting(const std::vector<std::string>& ids) = 0;

  // After a restart: tasks still `queued`/`routed` (no attempt started) are returned, oldest
  // first, to be run again; `running` ones are marked `interrupted` with their open attempt.
  // When cortexd `crashed` (a fault, not a kill from outside), every task that was being
  // routed or run then has that death counted; one that reaches kPoisonDeaths is failed
  // with the reason instead of being retried, so a task that crashes cortexd cannot do it
  // on every start (a poison task). Without a crash the routing marks are only cleared.
  struct Recovery {
    std::vector<Task> requeue;
    int interrupted = 0;
    std::vector<std::string> poisoned;  // failed by the guard
  };
  static constexpr int kPoisonDeaths = 2;
  virtual Status Recover(double time, bool crashed, Recovery* out) = 0;
  // The aggregates `cortexctl report` plots (see ReportData), in one read snapshot.
  virtual Status Report(const ReportQuery& q, ReportData* out) = 0;
  // cortexd is stopping: a report running ends now (Unavailable), and so do later ones.
  virtual void StopReports() = 0;
  virtual Status CountByState(std::vector<std::pair<std::string, long>>* counts) = 0;
  // OK, or why every write is refused: the file was deleted or replaced under cortexd.
  virtual Status Health() = 0;
  // Every commit so far is on the disk once this returns OK (see Admission::durable).
  virtual Status Sync() = 0;
  virtual int SchemaVersion() = 0;
  virtual std::string Path() const = 0;

  // A cluster (PostgreSQL only): this cortexd's node name. From then on new tasks are
  // this node's, an attempt starts only on a task this node owns, an outcome is recorded
  // only for an attempt still open, and Recover touches only this node's tasks.
  virtual Status SetNode(const std::string& node) {
    return Status::FailedPrecondition("a cluster needs a PostgreSQL store (store.url)");
  }
  // A cluster: cancels a task waiting in the shared queue (OK: it never runs). When a
  // node holds it, FailedPrecondition with that node in *owner.
  virtual Status CancelShared(const std::string& id, double time, std::string* owner) {
    return Status::FailedPrecondition("a cluster needs a PostgreSQL store (store.url)");
  }
  // A cluster: routed tasks of this node handed to the shared queue, each for the expert
  // its next attempt needs (nodes hosting it claim it there). Each task's status in `out`:
  // FailedPrecondition when this node no longer owns it.
  virtual void Release(const std::vector<std::pair<std::string, std::string>>& tasks,
                       std::vector<Status>* out) {
    out->assign(tasks.size(),
                Status::FailedPrecondition("a cluster needs a PostgreSQL store (store.url)"));
  }
};

// Opens (creating if needed) the store at `path`: a SQLite file, ":memory:" for a private
// in-memory store, or a postgresql:// URI (libpq's) for a PostgreSQL database, whose tables
// are made on first use. A file or database that is not Cortex's, or is newer than this
// build, is refused and left untouched.
Result<std::unique_ptr<Store>> OpenStore(const std::string& path);
// For a PostgreSQL database: whether OpenStore could use it (reachable; empty, or ours
// and not newer), without writing to it. A SQLite file's checks are the daemon's.
Status ProbeStore(const std::string& path);

}  // namespace cortex
