// The path of a task, submit → route → run → record (docs/ARCHITECTURE.md): new tasks
// are routed in batches and stored with their decisions (and first attempts, when their
// experts have room) in one commit before they are acknowledged; workers send batches of
// them to their experts, collect the outcomes as they come and record those that came
// together in one commit, then end each task or fall back; waiters are woken with the
// task as recorded. Tasks recovered from the store, and any that could not be routed at
// once, go through the dispatcher.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cortex/env.h"
#include "cortex/experts.h"
#include "cortex/router.h"
#include "cortex/status.h"
#include "cortex/store.h"

namespace cortex {

class Metrics;

struct PipelineOptions {
  Metrics* metrics = nullptr;  // counts what passes (cortexd's /metrics); may be null
  int workers = 4;
  size_t max_queued = 100000;  // tasks not yet running, at most
  int max_attempts = 2;
  double shutdown_grace_s = 10;
};

struct TaskWatch;  // a submitter's callback for a task's end (SubmitMany, Unwatch)

// A new task handed in with others (Pipeline::SubmitMany, the server's batches).
struct Submission {
  std::string text;
  Tags tags;
  double wait_s = -1;  // >= 0: its submitter waits that long for its end (as Submit)
  // With wait_s >= 0: called once, on the thread that ends the task, with the task as
  // recorded (null: read it from the store), unless Unwatch takes it back first. It must
  // not call into the pipeline.
  std::function<void(std::shared_ptr<const Task>)> on_end;
  // Set by SubmitMany:
  Status result;
  std::string id;
  std::shared_ptr<TaskWatch> watch;  // for Unwatch
};

// In a cluster (docs/CLUSTER.md): experts other live nodes host, as routing sees them.
struct RemoteExpert {
  std::string name, description;
  std::vector<std::string> keywords, examples;
  double load = 0;  // their busy share, all nodes hosting it together
};

// What the pipeline tells the rest of a cluster (Cluster implements it).
class ClusterHooks {
 public:
  virtual ~ClusterHooks() = default;
  virtual void Released(const std::vector<std::string>& experts) = 0;  // work queued for them
  virtual void Ended(const std::string& id) = 0;                       // a task's end is stored
  // A task not on this node: cancelled in the shared queue, or its node asked to.
  virtual Status CancelElsewhere(const std::string& id) = 0;
};

class Pipeline {
 public:
  // `router` gives the router in force (a reload replaces it); `on_outcome` is called
  // after each outcome is stored (it wakes the trainer); `stop` is cortexd's: once set,
  // nothing new is taken in.
  Pipeline(Store* store, ExpertRegistry* registry, std::function<std::shared_ptr<Router>()> router,
           Env* env, std::function<void()> on_outcome, const std::atomic<bool>& stop,
           PipelineOptions options);
  ~Pipeline();

  void Resume(std::vector<Task> tasks);  // recovered from the store: routed again
  void Start();                          // the dispatcher and the workers

  // Stores a new task; its id once it is durable. `wait_s` >= 0: the caller will wait
  // that long for its end (WaitDone), and so hears of the task only then: its admission
  // need not wait for the disk (Store::Admission::durable).
  Status Submit(const std::string& text, const Tags& tags, double wait_s, std::string* id);
  // Stores new tasks together (one routing, one commit), as Submit does each; sets every
  // submission's result, id and watch.
  void SubmitMany(std::vector<Submission>* batch);
  // Takes back a submission's on_end before it is called: true if it never will be, false
  // if it has been called (or is being called) already.
  bool Unwatch(const std::string& id, const std::shared_ptr<TaskWatch>& watch);
  Status Route(const std::string& text, const Tags& tags, Decision* d);  // a dry run
  Status Cancel(const std::string& id);
  // A cluster: another node asks this one to cancel a task (ignored if not here).
  void CancelHere(const std::string& id);
  Status WaitDone(const std::string& id, double timeout_s, Task* t, bool* done);

  void SlotFreed();  // an expert's slot came free (any thread)
  void Wake();       // the experts or the limits changed: look at the queues again
  void SetLimits(size_t max_queued, int max_attempts, double shutdown_grace_s);

  size_t QueueDepth();          // tasks waiting to run
  nlohmann::json StoreError();  // why writes fail now, or null
  void StoreWritten();          // a write elsewhere (a verdict, a model) succeeded: clears it
  void StopRouting();           // after stop is set: the dispatcher ends
  void StopRunning();           // running attempts get the grace period
  size_t Left();                // tasks left in the store for the next start

  // A cluster: set before Start. A job whose next expert only other nodes host is
  // handed to the shared queue; routing sees the remote experts (SetRemote).
  void SetCluster(ClusterHooks* hooks);
  void SetRemote(std::vector<RemoteExpert> remote);
  // Free slots per local expert, less the jobs already waiting for each: what this node
  // may claim from the shared queue.
  std::vector<std::pair<std::string, int>> FreeSlots();
  // Tasks claimed from the shared queue: routed ones go on to `want` (or the candidate
  // after their last attempt), unrouted ones to the dispatcher.
  void Adopt(std::vector<Task> tasks, const std::string& want);
  // Tasks that ended on other nodes (or were interrupted there): their waiters here hear.
  void RemoteEnded(const std::vector<std::string>& ids);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cortex
