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
  Status WaitDone(const std::string& id, double timeout_s, Task* t, bool* done);

  void SlotFreed();  // an expert's slot came free (any thread)
  void Wake();       // the experts or the limits changed: look at the queues again
  void SetLimits(size_t max_queued, int max_attempts, double shutdown_grace_s);

  size_t QueueDepth();          // tasks waiting to run
  nlohmann::json StoreError();  // why writes fail now, or null
  void StopRouting();           // after stop is set: the dispatcher ends
  void StopRunning();           // running attempts get the grace period
  size_t Left();                // tasks left in the store for the next start

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cortex
