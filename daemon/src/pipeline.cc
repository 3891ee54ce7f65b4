#include "pipeline.h"

#include "metrics.h"

#include <pthread.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <unordered_set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "cortex/group_queue.h"
#include "cortex/log.h"
#include "crash_marker.h"

namespace cortex {

using json = nlohmann::json;

namespace {

// The intake thread (and a request's thread) routes tasks too: it gets its signal stack
// on first use.
void CrashStackOnce() {
  static thread_local const bool kDone = (UseCrashStackOnThisThread(), true);
  (void)kDone;
}

}  // namespace

// Someone waiting for a task's end: a thread in WaitDone (woken by cv), or a callback
// (on_end, from SubmitMany) called once by whoever ends the task, unless Unwatch takes it
// back first (`claimed`, under waiters_mu_, says which came first).
struct TaskWatch {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  // The task as its end stored it, when the pipeline knows all of it (else it is read
  // from the store).
  std::shared_ptr<const Task> final;
  std::function<void(std::shared_ptr<const Task>)> on_end;
  bool claimed = false;
};

namespace {

using Waiter = TaskWatch;

struct Job {
  Task task;
  Decision decision;
  size_t next = 0;          // the candidate to try next
  int attempts = 0;         // attempts made so far
  int reruns = 0;           // of them, runs again after a neighbour's hang (not counted)
  std::string last_expert;  // whose attempt came last
  uint64_t generation = 0;  // of the registry when it was routed
  bool cancel = false;      // `cortexctl cancel`: ends cancelled instead of running
  // The expert whose slot it holds for its next attempt (taken, not yet used), and
  // whether that attempt is recorded already (a first attempt started at admission).
  std::shared_ptr<Expert> held;
  bool recorded = false;
};

// Wakes a worker running attempts: one of them is done, or there are started tasks to
// take on.
class Bell {
 public:
  void Ring() {
    {
      std::lock_guard<std::mutex> l(mu_);
      rung_ = true;
    }
    cv_.notify_one();
  }
  void Wait(std::chrono::milliseconds most) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, most, [&] { return rung_; });
    rung_ = false;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool rung_ = false;
};

// A worker's view of the active experts, read again only when the set changes (the
// generation first: a view is never older than the generation it is kept for). Read
// before queue_mu_ is taken: a rescan holding the registry must not hold up submissions.
struct ExpertView {
  std::map<std::string, std::shared_ptr<Expert>> experts;
  uint64_t generation = ~uint64_t{0};
  void Refresh(ExpertRegistry* registry) {
    if (const uint64_t g = registry->generation(); g != generation) {
      experts.clear();
      for (auto& e : registry->Active()) experts.emplace(e->name(), std::move(e));
      generation = g;
    }
  }
};

// One attempt of a job, from its start to its outcome (Pipeline::Impl::RunAttempts).
struct Run {
  Job job;
  std::shared_ptr<Expert> expert;
  int n = 0;              // the attempt's number
  double started_at = 0;  // as recorded
  double ended_at = 0;    // as recorded
  std::shared_ptr<std::atomic<bool>> stop = std::make_shared<std::atomic<bool>>(false);
  std::shared_ptr<Expert::Attempt> attempt;  // null: it never began
  bool collected = false;
  Outcome outcome;
  std::optional<TaskState> ends;  // the task's end, when this outcome ends it
  bool rerun = false;             // it runs again on the same expert (Conclude)
};

// A submit in the intake queue: its task, and once its batch is stored, the result.
struct Intake {
  Submission* sub = nullptr;  // what was handed in: wait_s, on_end (which watches the task)
  Task task;
  Status result = Status::Internal("the task was not stored");  // until its batch says
  std::shared_ptr<TaskWatch> watch;                             // set with the task live
};

}  // namespace

struct Pipeline::Impl {
  Impl(Store* store, ExpertRegistry* registry, std::function<std::shared_ptr<Router>()> router,
       Env* env, std::function<void()> on_outcome, const std::atomic<bool>& stop,
       PipelineOptions options)
      : store_(store),
        registry_(registry),
        router_(std::move(router)),
        env_(env),
        on_outcome_(std::move(on_outcome)),
        stop_(stop),
        options_(options),
        max_attempts_live_(options.max_attempts),
        max_queued_(options.max_queued),
        shutdown_grace_s_(options.shutdown_grace_s) {}

  void Start() {
    dispatcher_ = std::thread([this] {
      pthread_setname_np(pthread_self(), "dispatcher");
      DispatchLoop();
    });
    for (int i = 0; i < options_.workers; ++i)
      workers_.emplace_back([this] {
        pthread_setname_np(pthread_self(), "worker");
        WorkerLoop();
      });
  }

  // A task that already made attempts goes on down its decision's candidates (its next
  // attempt is a fallback, as if cortexd had not stopped); one that made none is routed
  // again by the dispatcher.
  void Resume(std::vector<Task> tasks) {
    {
      std::lock_guard<std::mutex> w(waiters_mu_);
      for (const auto& t : tasks) live_.insert(t.id);
    }
    const uint64_t generation = registry_->generation();
    std::lock_guard<std::mutex> l(queue_mu_);
    for (auto& t : tasks) {
      if (!t.decision || t.attempts.empty()) {
        queue_.push_back(std::move(t));
        continue;
      }
      Job job;
      job.decision = *t.decision;
      job.attempts = static_cast<int>(t.attempts.size());
      job.last_expert = t.attempts.back().expert;
      const auto& cands = job.decision.candidates;
      for (size_t i = 0; i < cands.size(); ++i)
        if (cands[i].expert == job.last_expert) job.next = i + 1;
      job.generation = generation;
      job.task = std::move(t);
      ready_.push_back(std::move(job));
    }
  }

  void Wake() {
    queue_cv_.notify_all();
    work_cv_.notify_all();
  }

  void SlotFreed() {
    if (!slot_wanted_.load()) return;
    work_cv_.notify_all();
    RingARunner();
  }

  // A worker busy with attempts looks at the queues again (new started tasks, a slot).
  void RingARunner() {
    std::lock_guard<std::mutex> l(runners_mu_);
    if (!runners_.empty()) runners_.front()->Ring();
  }

  void SetLimits(size_t max_queued, int max_attempts, double shutdown_grace_s) {
    max_queued_ = max_queued;
    max_attempts_live_ = max_attempts;
    shutdown_grace_s_ = shutdown_grace_s;
    Wake();
  }

  size_t QueueDepth() {
    std::lock_guard<std::mutex> l(queue_mu_);
    return queue_.size() + ready_.size();
  }

  void StopRouting() {
    Wake();
    if (dispatcher_.joinable()) dispatcher_.join();
  }

  // Attempts running (on workers and on submitters' threads) and those recorded but not
  // yet begun get the grace period; then whatever still runs is cancelled (interrupted),
  // and an attempt that never began is taken back, its task left routed for the next
  // start. Returns once no thread is inside the pipeline any more.
  void StopRunning() {
    auto deadline =
        std::chrono::steady_clock::now() +
        std::chrono::milliseconds(static_cast<int64_t>(shutdown_grace_s_.load() * 1000));
    {
      std::unique_lock<std::mutex> l(queue_mu_);
      auto busy = [&] { return busy_workers_ > 0 || !started_.empty() || admitting_ > 0; };
      if (busy())
        LogInfo("stopping: waiting up to {:g}s (daemon.shutdown_grace) for {} running task(s)",
                shutdown_grace_s_.load(), running_ + started_.size());
      while (busy() && std::chrono::steady_clock::now() < deadline)
        queue_cv_.wait_for(l, std::chrono::milliseconds(50));
    }
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      abort_ = true;
      for (auto& [id, stop] : attempt_stops_) stop->store(true);
    }
    Wake();
    for (auto& w : workers_) w.join();
    workers_.clear();
    // Submitters still inside (a batch being stored) leave before the pipeline can go.
    std::unique_lock<std::mutex> l(queue_mu_);
    while (in_submit_ > 0) queue_cv_.wait_for(l, std::chrono::milliseconds(50));
    std::deque<Job> unbegun = std::move(started_);
    l.unlock();
    for (Job& j : unbegun) UndoStart(j.task.id, 1, j.held);
  }

  // An attempt recorded but never begun: its slot is given back and the store forgets it.
  void UndoStart(const std::string& id, int n, const std::shared_ptr<Expert>& expert) {
    expert->ReleaseSlot();
    if (Status st = store_->UndoStart(id, n); !st.ok())
      LogWarn(
          "task {}: cannot take back attempt {} that never began ({}); it will read as "
          "interrupted",
          id, n, st.ToString());
    std::lock_guard<std::mutex> l(queue_mu_);
    ++undone_;
  }

  size_t Left() {
    std::lock_guard<std::mutex> l(queue_mu_);
    return queue_.size() + ready_.size() + undone_;
  }

  Status Submit(const std::string& text, const Tags& tags, double wait_s, std::string* id) {
    std::vector<Submission> one(1);
    one[0].text = text;
    one[0].tags = tags;
    one[0].wait_s = wait_s;
    SubmitMany(&one);
    if (one[0].result.ok()) *id = one[0].id;
    return one[0].result;
  }

  // Each submission's result, id and watch are set; those refused (a full queue, a
  // stop) never reach the store.
  void SubmitMany(std::vector<Submission>* batch) {
    std::vector<Intake> in(batch->size());
    std::vector<Intake*> admit;
    {
      // Every task not yet running counts, wherever it is: queued, being routed, routed
      // and waiting for a slot, or being stored by another submit right now.
      std::lock_guard<std::mutex> l(queue_mu_);
      size_t waiting = queue_.size() + ready_.size() + started_.size() + routing_ + admitting_;
      for (size_t i = 0; i < batch->size(); ++i) {
        Submission& s = (*batch)[i];
        if (stop_.load()) {
          s.result = Status::Unavailable("cortexd is stopping; submit again after restart");
        } else if (waiting >= max_queued_.load()) {
          s.result = Status::ResourceExhausted(
              fmt::format("the queue is full ({} tasks waiting, daemon.max_queued); try again "
                          "once some have run",
                          waiting));
        } else {
          ++admitting_;  // its place is held until it is stored (the leader gives it back)
          ++waiting;
          in[i].sub = &s;
          admit.push_back(&in[i]);
        }
      }
      if (admit.empty()) return;
      ++in_submit_;
    }
    // A stop waits until no thread is in here (StopRunning).
    struct Inside {
      Impl* p;
      ~Inside() { p->Leave(&p->in_submit_); }
    } inside{this};
    const double now = env_->NowUnix();
    const int64_t mono = env_->MonotonicMicros();
    for (Intake* me : admit) {
      me->task.text = me->sub->text;
      me->task.tags = me->sub->tags;
      me->task.state = TaskState::kQueued;
      me->task.created_at = me->task.updated_at = now;
      me->task.created_mono_us = mono;
    }
    for (int tries = 0; !admit.empty(); ++tries) {
      for (Intake* me : admit) me->task.id = NewId();
      // Group admission, as the store's group commit: the submit at the front of the
      // intake routes and stores every task queued behind it in one batch.
      intake_.Run(admit,
                  [this](const std::vector<Intake*>& group, const std::function<void()>& hand_on) {
                    AdmitBatch(group, hand_on);
                  });
      std::vector<Intake*> again;
      for (Intake* me : admit) {
        if (me->result.ok()) {
          me->sub->result = Status::OK();
          me->sub->id = me->task.id;
          me->sub->watch = std::move(me->watch);
          continue;
        }
        NoteStoreFailure(me->result);
        if (tries < 3 && !stop_.load()) {
          again.push_back(me);
          continue;
        }
        std::lock_guard<std::mutex> l(queue_mu_);
        --admitting_;
        me->sub->result = me->result.WithContext("storing the task (not acknowledged)");
      }
      admit = std::move(again);
    }
  }

  Status Route(const std::string& text, const Tags& tags, Decision* d) {
    std::vector<ExpertSlot> slots = Slots(nullptr);
    std::vector<Decision> out;
    CORTEX_RETURN_IF_ERROR(
        router_()->Route({{text, tags}}, slots, /*explore=*/false, env_->NowUnix(), &out));
    *d = std::move(out.front());
    return Status::OK();
  }

  // Routes a batch for real (exploring, unlike the dry run above), timed for the metrics.
  Status Decide(const std::vector<RouteRequest>& reqs, const std::vector<ExpertSlot>& slots,
                std::vector<Decision>* decisions) {
    const int64_t t0 = env_->MonotonicMicros();
    CORTEX_RETURN_IF_ERROR(router_()->Route(reqs, slots, true, env_->NowUnix(), decisions));
    if (metrics_) metrics_->Routed(*decisions, (env_->MonotonicMicros() - t0) / 1e6);
    return Status::OK();
  }

  Status Cancel(const std::string& id, bool forward = true) {
    std::vector<Job> ended;  // taken out of the queues: they end here, not on a worker
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      for (auto it = queue_.begin(); it != queue_.end(); ++it)
        if (it->id == id) {
          Job j;
          j.task = std::move(*it);
          queue_.erase(it);
          ended.push_back(std::move(j));
          break;
        }
      for (auto it = ready_.begin(); ended.empty() && it != ready_.end(); ++it)
        if (it->task.id == id) {
          ended.push_back(std::move(*it));
          ready_.erase(it);
          break;
        }
      if (ended.empty()) {
        // Running (its expert is asked to stop), or between the queues (routing, or a
        // worker about to start it): it is stopped where it is found next.
        auto run = attempt_stops_.find(id);
        if (run != attempt_stops_.end()) run->second->store(true);
        cancels_.insert(id);
      }
    }
    if (!ended.empty()) {
      ended[0].cancel = true;
      EndTask(ended[0], TaskState::kCancelled);
      return Status::OK();
    }
    Task t;
    CORTEX_RETURN_IF_ERROR(store_->GetTask(id, &t));
    if (IsFinal(t.state)) {
      std::lock_guard<std::mutex> l(queue_mu_);
      cancels_.erase(id);
      return Status::FailedPrecondition("task " + id + " has already ended: " + ToString(t.state));
    }
    if (cluster_) {
      bool here;
      {
        std::lock_guard<std::mutex> w(waiters_mu_);
        here = live_.count(id) > 0;
      }
      if (!here) {  // the shared queue has it, or another node (which is asked to)
        {
          std::lock_guard<std::mutex> l(queue_mu_);
          cancels_.erase(id);
        }
        return forward ? cluster_->CancelElsewhere(id) : Status::OK();
      }
    }
    return Status::OK();
  }

  Status WaitDone(const std::string& id, double timeout_s, Task* t, bool* done) {
    // A task this cortexd still runs is waited for; any other has ended or is not ours.
    // In a cluster another node may be running it: its end comes as a notification.
    std::shared_ptr<Waiter> w;
    {
      std::lock_guard<std::mutex> l(waiters_mu_);
      if (live_.count(id) || cluster_) {
        w = std::make_shared<Waiter>();
        waiters_[id].push_back(w);
      }
    }
    auto forget = [&] {
      std::lock_guard<std::mutex> l(waiters_mu_);
      auto& v = waiters_[id];
      v.erase(std::remove(v.begin(), v.end(), w), v.end());
      if (v.empty()) waiters_.erase(id);
    };
    std::shared_ptr<const Task> final;
    if (w && cluster_) {  // (registered first: an end from now on is not missed)
      Task now;
      if (Status st = store_->GetTask(id, &now); !st.ok()) {
        forget();
        return st;
      }
      if (IsFinal(now.state)) final = std::make_shared<const Task>(std::move(now));
    }
    if (w && !final) {
      auto deadline = std::chrono::steady_clock::now() +
                      std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
      std::unique_lock<std::mutex> l(w->mu);
      while (!w->done && !stop_.load() && std::chrono::steady_clock::now() < deadline)
        w->cv.wait_for(l, std::chrono::milliseconds(200));
      final = w->final;
    }
    if (w) forget();
    // The end as the pipeline recorded it saves reading it back (`show` reads the same).
    if (final) {
      *t = *final;
      *done = true;
      return Status::OK();
    }
    CORTEX_RETURN_IF_ERROR(store_->GetTask(id, t));
    *done = IsFinal(t->state);
    // Its submitter hears of it now, before its end: it must be on the disk first (its
    // admission may not have waited for that).
    if (!*done) CORTEX_RETURN_IF_ERROR(store_->Sync());
    if (!*done && w && stop_.load())  // not a timeout: say why the wait ended
      return Status::Unavailable(fmt::format(
          "cortexd is stopping before task {} ended ({} now); it stays in the store and goes "
          "on at the next start: `cortexctl wait {}` then",
          id, ToString(t->state), id));
    return Status::OK();
  }

  // Profiles of the active experts (manifest features cached per registry generation).
  std::vector<ExpertSlot> Slots(std::vector<std::shared_ptr<Expert>>* experts_out) {
    // The generation is read before the experts, so a rescan in between only causes
    // one more clear on the next call, never a stale profile under a new generation.
    const uint64_t generation = registry_->generation();
    auto experts = registry_->Active();
    auto router = router_();
    std::lock_guard<std::mutex> l(profiles_mu_);
    if (profiles_generation_ != generation) {  // manifests may have changed: refill on demand
      profiles_.clear();
      profiles_generation_ = generation;
    }
    std::map<std::string, int> waiting;  // routed jobs waiting for each expert's slot
    {
      std::lock_guard<std::mutex> q(queue_mu_);
      for (const auto& j : ready_)
        if (j.next < j.decision.candidates.size()) ++waiting[j.decision.candidates[j.next].expert];
    }
    std::vector<ExpertSlot> slots;
    for (const auto& e : experts) {
      auto it = profiles_.find(e->name());
      if (it == profiles_.end()) {
        const Manifest& m = e->manifest();
        it =
            profiles_
                .emplace(e->name(),
                         router->hasher().Manifest({m.name, m.description, m.keywords, m.examples}))
                .first;
      }
      auto w = waiting.find(e->name());
      const double load =
          w == waiting.end()
              ? e->load()
              : std::min(1.0, (e->inflight() + w->second) /
                                  static_cast<double>(std::max(1, e->manifest().capacity)));
      slots.push_back({{e->name(), it->second}, load, e->health_penalty()});
    }
    if (cluster_) {  // experts only other nodes host, with their load there
      std::set<std::string> local;
      for (const auto& e : experts) local.insert(e->name());
      std::lock_guard<std::mutex> r(remote_mu_);
      for (const RemoteExpert& x : remote_) {
        if (local.count(x.name)) continue;
        auto it = remote_profiles_.find(x.name);
        if (it == remote_profiles_.end())
          it = remote_profiles_
                   .emplace(x.name, router->hasher().Manifest(
                                        {x.name, x.description, x.keywords, x.examples}))
                   .first;
        slots.push_back({{x.name, it->second}, x.load, 0});
      }
    }
    if (experts_out) *experts_out = std::move(experts);
    return slots;
  }

  // New tasks are routed before they are stored, and stored with their decisions (and,
  // for those a worker can start at once, their first attempt) in one commit: one fsync
  // between a submit and the run. Nothing is acknowledged before that commit, so a crash
  // while routing them leaves nothing behind to crash again. A task that cannot be
  // routed now (no experts loaded, a routing error) is stored as queued for the
  // dispatcher. Each submit's status is set in its Intake; the bound's places they held
  // are given back as they enter the queues.
  void AdmitBatch(const std::vector<Intake*>& group, const std::function<void()>& hand_on) {
    CrashStackOnce();  // routing runs here: a poison task's overflow must reach the handler
    const uint64_t generation = registry_->generation();  // before the experts are read
    std::vector<std::shared_ptr<Expert>> experts;
    std::vector<ExpertSlot> slots = Slots(&experts);
    std::vector<Decision> decisions;
    bool routed = false;
    if (!slots.empty()) {
      std::vector<RouteRequest> reqs;
      for (const Intake* in : group) reqs.push_back({in->task.text, in->task.tags});
      Status st = Decide(reqs, slots, &decisions);
      if (st.ok())
        routed = true;
      else
        LogError("cannot route {} new task(s) ({}); they wait in the queue", group.size(),
                 st.ToString());
    }
    // Started now: a task whose chosen expert has a free slot. An idle worker takes the
    // batch's started tasks (all of them: it runs them together), or a busy one takes
    // them on beside its own. (A forced decision's chosen expert is its only one; a busy
    // or absent one leaves the task routed, for the workers to start once it has room.)
    std::vector<std::shared_ptr<Expert>> held(group.size());
    if (routed && !stop_.load()) {  // a stop leaves them routed, for the next start
      for (size_t i = 0; i < group.size(); ++i) {
        const std::string& chosen = decisions[i].chosen;
        for (const auto& e : experts) {
          if (e->name() != chosen) continue;
          if (!e->quarantined() && e->TryAcquireSlot()) held[i] = e;
          break;
        }
      }
    }
    // A task whose submitter waits for its end is acknowledged only in the answer to that
    // wait: after its outcome's commit, which waits for the disk and so covers this one
    // (or after a Sync, when the wait ends first; WaitDone). Its admission need not wait
    // for the disk too. It is written (to the kernel) before it runs, so a crash of
    // cortexd alone never loses it; a power cut can, with its submitter never answered.
    std::vector<Store::Admission> batch;
    for (size_t i = 0; i < group.size(); ++i)
      batch.push_back({&group[i]->task, routed ? &decisions[i] : nullptr,
                       held[i] ? held[i]->name() : std::string(), group[i]->sub->wait_s < 0});
    {
      // Live before they can be seen in the store: a `wait` for one then waits, and a
      // submitter's callback is in place before the task can end.
      std::lock_guard<std::mutex> w(waiters_mu_);
      for (Intake* in : group) {
        live_.insert(in->task.id);
        if (in->sub->wait_s >= 0 && in->sub->on_end) {
          in->watch = std::make_shared<Waiter>();
          in->watch->on_end = in->sub->on_end;
          waiters_[in->task.id].push_back(in->watch);
        }
      }
    }
    // The next batch is routed while this one waits for its commit: the store's group
    // commit may then take both (and outcomes) in one.
    hand_on();
    std::vector<Status> stored;
    store_->Admit(batch, &stored);
    {
      std::lock_guard<std::mutex> w(waiters_mu_);
      for (size_t i = 0; i < group.size(); ++i)
        if (!stored[i].ok()) {
          live_.erase(group[i]->task.id);
          waiters_.erase(group[i]->task.id);  // (only its own submitter's, if any)
          group[i]->watch.reset();
        }
    }
    std::vector<Job> jobs;
    std::vector<Task> queued;
    for (size_t i = 0; i < group.size(); ++i) {
      Intake& in = *group[i];
      in.result = stored[i];
      if (!stored[i].ok()) {
        if (held[i]) held[i]->ReleaseSlot();
        continue;
      }
      if (!routed) {
        queued.push_back(in.task);
        continue;
      }
      WarnIfForcedExpertAbsent(in.task.id, decisions[i], slots);
      Job job;
      job.task = in.task;
      job.decision = std::move(decisions[i]);
      job.generation = generation;
      job.held = std::move(held[i]);
      job.recorded = job.held != nullptr;
      jobs.push_back(std::move(job));
    }
    if (!jobs.empty() || !queued.empty()) NoteStoreSuccess();
    if (metrics_) metrics_->Admitted(jobs.size() + queued.size());
    size_t started = 0, routed_only = 0;
    {
      std::lock_guard<std::mutex> q(queue_mu_);
      for (Intake* in : group)
        if (in->result.ok()) --admitting_;  // a failed one is tried again or given back
      for (auto& j : jobs) {
        if (j.held)
          ++started;
        else
          ++routed_only;
        (j.held ? started_ : ready_).push_back(std::move(j));
      }
      for (auto& t : queued) queue_.push_back(std::move(t));
    }
    // Whoever comes first takes them: an idle worker or a busy one.
    if (started || routed_only) RingARunner();
    if (!queued.empty()) queue_cv_.notify_all();
    for (size_t i = 0;
         i < routed_only + (started ? 1 : 0) && i < static_cast<size_t>(options_.workers); ++i)
      work_cv_.notify_one();
  }

  // A force rule sends the task to an expert that cannot take it now: it waits (logged).
  void WarnIfForcedExpertAbsent(const std::string& id, const Decision& d,
                                const std::vector<ExpertSlot>& slots) {
    if (!d.forced || std::any_of(slots.begin(), slots.end(),
                                 [&](const ExpertSlot& s) { return s.profile.name == d.chosen; }))
      return;
    const std::shared_ptr<Expert> there = registry_->Find(d.chosen);
    LogWarn(
        "task {}: a force rule ({}) sends it to expert '{}', which {}, or `cortexctl "
        "cancel {}`",
        id, fmt::join(d.candidates.front().rules, ", "), d.chosen,
        there && there->quarantined()
            ? fmt::format("is quarantined: it waits until `cortexctl experts release {}`", d.chosen)
            : fmt::format("is not loaded: it waits until '{}' is loaded", d.chosen),
        id);
  }

  void DispatchLoop() {
    UseCrashStackOnThisThread();  // routing is where a poison task would overflow a stack
    // Routed jobs wait in ready_ for a slot without holding a worker, so routing never
    // waits for capacity; a small batch keeps each decision's load picture fresh (the
    // load an expert shows counts the jobs already waiting for it).
    const size_t max_batch = static_cast<size_t>(options_.workers) * 2;
    while (true) {
      std::vector<Task> batch;
      {
        std::unique_lock<std::mutex> l(queue_mu_);
        queue_cv_.wait_for(l, std::chrono::milliseconds(500),
                           [&] { return stop_.load() || !queue_.empty(); });
        if (stop_.load()) return;
        if (queue_.empty()) continue;
        // A task that was in flight when cortexd died is a suspect: it is routed alone,
        // so a second death is counted against it and not against its batch mates.
        size_t n = std::min(queue_.size(), max_batch);
        if (queue_.front().deaths > 0) n = 1;
        for (size_t i = 0; i < n && (i == 0 || queue_.front().deaths == 0); ++i) {
          batch.push_back(std::move(queue_.front()));
          queue_.pop_front();
        }
        routing_ += batch.size();
      }
      // Cancelled while the dispatcher held them (say, waiting for an expert): they end.
      for (auto it = batch.begin(); it != batch.end();) {
        if (!CancelRequested(it->id)) {
          ++it;
          continue;
        }
        Job j;
        j.task = std::move(*it);
        j.cancel = true;
        EndTask(j, TaskState::kCancelled);
        it = batch.erase(it);
        std::lock_guard<std::mutex> l(queue_mu_);
        --routing_;
      }
      if (batch.empty()) continue;
      const uint64_t generation = registry_->generation();  // before the experts are read
      std::vector<ExpertSlot> slots = Slots(nullptr);
      if (slots.empty()) {
        // Nothing to route to: put the batch back (unmarked: the router never saw it) and
        // wait for an expert to appear.
        Requeue(&batch, std::chrono::seconds(1));
        continue;
      }
      std::vector<std::string> ids;
      for (const auto& t : batch) ids.push_back(t.id);
      if (Status ms = store_->MarkRouting(ids); !ms.ok()) {
        // Without the mark a crash here could repeat on every start: wait for the store.
        LogError("cannot mark {} task(s) as routing ({}); retrying", ids.size(), ms.ToString());
        Requeue(&batch, std::chrono::seconds(1));
        continue;
      }
      std::vector<RouteRequest> reqs;
      for (const auto& t : batch) reqs.push_back({t.text, t.tags});
      std::vector<Decision> decisions;
      if (Status st = Decide(reqs, slots, &decisions); !st.ok()) {
        LogError("cannot route {} task(s) ({}); retrying", ids.size(), st.ToString());
        Requeue(&batch, std::chrono::seconds(1));
        continue;
      }
      std::vector<Job> jobs;
      std::vector<Task> unrecorded;  // routed again once the store takes writes
      // The batch's decisions in one commit (one fsync), each with its own status.
      std::vector<std::pair<std::string, const Decision*>> to_record;
      for (size_t i = 0; i < batch.size(); ++i) to_record.emplace_back(batch[i].id, &decisions[i]);
      std::vector<Status> recorded;
      store_->RecordDecisions(to_record, &recorded);
      for (size_t i = 0; i < batch.size(); ++i) {
        const Status& rs = recorded[i];
        if (!rs.ok()) {
          NoteStoreFailure(rs);
          LogError("task {}: cannot record its decision ({}); routing it again shortly",
                   batch[i].id, rs.ToString());
          unrecorded.push_back(std::move(batch[i]));
          continue;
        }
        WarnIfForcedExpertAbsent(batch[i].id, decisions[i], slots);
        Job job;
        job.task = std::move(batch[i]);
        job.decision = std::move(decisions[i]);
        job.generation = generation;
        jobs.push_back(std::move(job));
      }
      if (!jobs.empty()) NoteStoreSuccess();
      {
        std::lock_guard<std::mutex> l(queue_mu_);
        routing_ -= jobs.size();
        for (auto& j : jobs) ready_.push_back(std::move(j));
      }
      work_cv_.notify_all();
      RingARunner();
      if (!unrecorded.empty()) Requeue(&unrecorded, std::chrono::seconds(1));
    }
  }

  // Puts `batch` back at the head of the queue, in order, and waits `pause` (or for stop)
  // before the dispatcher tries again.
  void Requeue(std::vector<Task>* batch, std::chrono::milliseconds pause) {
    std::unique_lock<std::mutex> l(queue_mu_);
    routing_ -= batch->size();
    for (auto it = batch->rbegin(); it != batch->rend(); ++it) queue_.push_front(std::move(*it));
    batch->clear();
    queue_cv_.wait_for(l, pause, [&] { return stop_.load(); });
  }

  // Workers take only work that can start now: a job whose next expert has a free slot
  // (taken here, before anything is recorded). A job for a busy expert stays in ready_
  // and holds no worker; a freed slot wakes the workers (Supervision::on_slot_free).
  void WorkerLoop() {
    UseCrashStackOnThisThread();  // an in-process plugin runs on this stack
    ExpertView view;
    auto& experts = view.experts;
    auto& seen = view.generation;
    while (true) {
      Job job;
      std::shared_ptr<Expert> expert;
      std::vector<Job> started;  // recorded at admission: run together
      while (true) {
        view.Refresh(registry_);
        std::unique_lock<std::mutex> l(queue_mu_);
        // A started job is already recorded as running: it runs even during a stop
        // (within the grace period, as every running attempt), and so does one an
        // admission still under way may add.
        if (abort_.load() || (stop_.load() && started_.empty() && admitting_ == 0)) return;
        if (!started_.empty()) {
          TakeStartedLocked(&started);
          ++busy_workers_;
          break;
        }
        if (stop_.load()) {
          work_cv_.wait_for(l, std::chrono::milliseconds(50));
          continue;
        }
        const bool picked = PickLocked(experts, seen, &job, &expert);
        if (std::exchange(requeued_, false)) queue_cv_.notify_all();  // for the dispatcher
        if (picked) {
          ++busy_workers_;
          if (expert && !job.cancel) ++running_;
          break;
        }
        if (!releases_.empty()) {
          l.unlock();
          FlushReleases();
          continue;
        }
        slot_wanted_ = !ready_.empty();
        work_cv_.wait_for(l, std::chrono::milliseconds(200));
      }
      FlushReleases();
      if (!started.empty()) {
        RunAttempts(std::move(started), &view);
      } else if (job.cancel) {
        EndTask(job, TaskState::kCancelled);
      } else if (expert) {
        job.held = std::move(expert);
        std::vector<Job> one;
        one.push_back(std::move(job));
        RunAttempts(std::move(one), &view);
      } else {
        EndTask(job, TaskState::kFailed);  // no candidate left to try
      }
      Leave(&busy_workers_);
    }
  }

  // A thread leaves what `count` counts (busy_workers_, in_submit_; queue_mu_): during a
  // stop, StopRunning waits for these, so it is told.
  void Leave(int* count) {
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      --*count;
    }
    if (stop_.load()) queue_cv_.notify_all();
  }

  // The first job in ready_ that can run now (its slot taken: `expert` is set) or that has
  // no attempt left (`expert` stays null: it ends failed). A job whose candidates all
  // vanished before any attempt goes back to be routed again. Holds queue_mu_.
  bool PickLocked(const std::map<std::string, std::shared_ptr<Expert>>& experts,
                  uint64_t generation, Job* out, std::shared_ptr<Expert>* expert) {
    const int max_attempts = max_attempts_live_.load();
    std::set<std::string> full;  // experts found busy in this scan: not asked again
    for (auto it = ready_.begin(); it != ready_.end();) {
      Job& j = *it;
      if (cancels_.count(j.task.id)) {
        j.cancel = true;
        *out = std::move(j);
        ready_.erase(it);
        return true;
      }
      const auto& cands = j.decision.candidates;
      // Removed or quarantined since the decision: not an attempt, try the next one. A
      // forced decision is policy: that expert only, one attempt, no fallback.
      auto usable = [&](const Candidate& c) {
        if (j.decision.forced && c.expert != j.decision.chosen) return false;
        auto e = experts.find(c.expert);
        if (e == experts.end()) return remote_names_.count(c.expert) > 0;  // another node's
        return !e->second->quarantined();
      };
      while (j.next < cands.size() && !usable(cands[j.next])) ++j.next;
      if (j.next >= cands.size() ||
          j.attempts - j.reruns >= (j.decision.forced ? 1 : max_attempts)) {
        if (j.attempts == 0) {
          // No candidate can run it yet. If the experts changed since it was routed, it is
          // routed again; if not (all quarantined), it waits here for a release instead of
          // being routed again and again.
          j.next = 0;
          if (generation == j.generation) {
            ++it;
            continue;
          }
          queue_.push_back(std::move(j.task));
          it = ready_.erase(it);
          requeued_ = true;
          continue;
        }
        *out = std::move(j);
        ready_.erase(it);
        return true;
      }
      const std::string& name = cands[j.next].expert;
      if (!experts.count(name)) {  // only other nodes host it: to the shared queue
        releases_.push_back(std::move(j));
        it = ready_.erase(it);
        continue;
      }
      if (!full.count(name)) {
        const std::shared_ptr<Expert>& e = experts.at(name);
        if (e->TryAcquireSlot()) {
          *expert = e;
          *out = std::move(j);
          ready_.erase(it);
          return true;
        }
        full.insert(name);
      }
      ++it;
    }
    return false;
  }

  // Attempts, each on a slot its job holds (`held`): all are sent to their experts first,
  // then collected as they finish; those that finish together are recorded in one commit.
  // Then each task ends or waits for its next candidate in ready_. While its attempts
  // run, the worker also takes on what an idle worker would (started_, and ready_ jobs
  // whose expert has room), so no task waits for a worker whose attempts are slow.
  void RunAttempts(std::vector<Job> jobs, ExpertView* view) {
    std::deque<Run> runs;  // (stable addresses: Conclude takes pointers)
    auto bell = std::make_shared<Bell>();
    auto ring = [bell] { bell->Ring(); };
    {
      std::lock_guard<std::mutex> l(runners_mu_);
      runners_.push_back(bell);
    }
    size_t left = Begin(std::move(jobs), ring, &runs);
    while (true) {
      // Those done (or past their deadline, or told to stop) are collected and recorded
      // together. A stop or cancel is seen within 100 ms, as a deadline.
      std::vector<Run*> now;
      for (Run& r : runs) {
        if (r.collected || (r.attempt && !r.expert->Ready(*r.attempt))) continue;
        r.collected = true;
        --left;
        if (r.attempt) r.outcome = r.expert->Await(*r.attempt);
        now.push_back(&r);
      }
      if (!now.empty()) Conclude(now);
      while (!runs.empty() && runs.front().collected) runs.pop_front();
      // Meanwhile this worker serves the queues as an idle one would: started tasks, and
      // routed ones (fallbacks, recovered tasks, those whose expert was full) whose next
      // expert has room now.
      std::vector<Job> more, ends;
      view->Refresh(registry_);
      {
        std::lock_guard<std::mutex> l(queue_mu_);
        if (!abort_.load()) TakeStartedLocked(&more);
        if (!stop_.load()) {
          while (more.size() + ends.size() < kMaxIntake) {
            Job j;
            std::shared_ptr<Expert> e;
            if (!PickLocked(view->experts, view->generation, &j, &e)) break;
            if (j.cancel || !e) {
              ends.push_back(std::move(j));  // ended below, outside the lock
              continue;
            }
            j.held = std::move(e);
            ++running_;
            more.push_back(std::move(j));
          }
          slot_wanted_ = !ready_.empty();
          if (std::exchange(requeued_, false)) queue_cv_.notify_all();  // for the dispatcher
        }
        if (more.empty() && ends.empty() && left == 0) {
          std::lock_guard<std::mutex> r(runners_mu_);
          runners_.erase(std::find(runners_.begin(), runners_.end(), bell));
          return;
        }
      }
      FlushReleases();
      for (const Job& j : ends) EndTask(j, j.cancel ? TaskState::kCancelled : TaskState::kFailed);
      if (!more.empty()) {
        left += Begin(std::move(more), ring, &runs);
        continue;
      }
      if (!ends.empty()) continue;
      bell->Wait(std::chrono::milliseconds(100));
    }
  }

  // Started jobs (recorded at admission), as many as one batch takes. Holds queue_mu_.
  void TakeStartedLocked(std::vector<Job>* out) {
    for (size_t n = 0; n < kMaxIntake && !started_.empty(); ++n) {
      out->push_back(std::move(started_.front()));
      started_.pop_front();
    }
    running_ += out->size();
  }

  // Records what is not yet recorded and sends each job to its expert; returns how many
  // were added to *runs.
  size_t Begin(std::vector<Job> jobs, const std::function<void()>& ring, std::deque<Run>* runs) {
    const size_t first = runs->size();
    // An attempt is recorded when it really starts (its slot is held), so recovery re-runs
    // what never started; a first attempt started at admission is recorded already. The
    // others are recorded together (one commit).
    std::vector<Store::AttemptStart> starts;
    for (const Job& j : jobs)
      if (!j.recorded) starts.push_back({j.task.id, j.attempts + 1, j.held->name(), Stamp(j.task)});
    std::vector<Status> recorded;
    if (!starts.empty()) store_->StartAttempts(starts, &recorded);
    size_t k = 0;
    for (Job& j : jobs) {
      Run r;
      r.expert = std::move(j.held);
      r.n = j.attempts + 1;
      r.started_at = j.recorded ? j.decision.time : starts[k].time;  // (k: this job's start)
      // One the store refused (a full disk) is held here, in memory, until it takes it or
      // cortexd stops (the task is then resumed from the store at the next start).
      const Status rs = j.recorded ? Status::OK() : recorded[k++];
      if (rs.code() == Status::Code::kFailedPrecondition) {  // another node's now: not run here
        LogWarn("task {}: not started here: {}", j.task.id, rs.message());
        r.expert->ReleaseSlot();
        std::lock_guard<std::mutex> l(queue_mu_);
        --running_;
        continue;
      }
      if (!rs.ok() && !Persist(fmt::format("task {}: recording attempt {}", j.task.id, r.n), [&] {
            return store_->StartAttempt(j.task.id, r.n, r.expert->name(), r.started_at);
          })) {
        r.expert->ReleaseSlot();
        std::lock_guard<std::mutex> l(queue_mu_);
        --running_;
        continue;
      }
      r.job = std::move(j);
      runs->push_back(std::move(r));
    }
    // An attempt stops early when cortexd's grace period ends or its task is cancelled;
    // one cancelled or stopped before it began (while it waited for a worker) never
    // reaches its expert.
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      for (size_t i = first; i < runs->size(); ++i) {
        Run& r = (*runs)[i];
        if (abort_.load() || cancels_.count(r.job.task.id)) r.stop->store(true);
        attempt_stops_[r.job.task.id] = r.stop;
      }
    }
    {
      Expert::SendTogether together;  // one write per plugin host for the batch
      for (size_t i = first; i < runs->size(); ++i) {
        Run& r = (*runs)[i];
        if (!r.stop->load()) r.attempt = r.expert->Begin(r.job.task, r.stop, ring);
      }
    }
    return runs->size() - first;
  }

  // Records the outcomes of attempts that finished together (one commit), then ends
  // their tasks or sends them on to their next candidates.
  void Conclude(const std::vector<Run*>& now) {
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      for (Run* r : now) attempt_stops_.erase(r->job.task.id);
      running_ -= now.size();
    }
    std::vector<Run*> outs;  // those with an outcome to record
    for (Run* r : now) {
      const std::string& id = r->job.task.id;
      Outcome& o = r->outcome;
      const bool cancelled = CancelRequested(id);
      if (!r->attempt) {
        if (!cancelled) {  // cortexd stops: run it next time
          UndoStart(id, r->n, r->expert);
          continue;
        }
        r->expert->ReleaseSlot();
        o.kind = OutcomeKind::kInterrupted;
      }
      if (r->stop->load() && o.kind != OutcomeKind::kSuccess) {
        o.kind = OutcomeKind::kInterrupted;
        o.error = cancelled ? "cancelled (cortexctl cancel)"
                            : "cortexd stopped before the attempt finished";
      } else if (o.kind == OutcomeKind::kInterrupted && !cancelled && r->job.reruns == 0) {
        // Its expert's host was killed for another task's hang: it runs again there, once,
        // and this attempt does not count against router.max_attempts. A second time, the
        // task ends interrupted.
        r->rerun = true;
      }
      // An outcome that ends the task is written with the task's end, in one commit.
      if (o.kind == OutcomeKind::kSuccess)
        r->ends = TaskState::kSucceeded;
      else if (cancelled)
        r->ends = TaskState::kCancelled;
      else if (o.kind == OutcomeKind::kInterrupted && !r->rerun)
        r->ends = TaskState::kInterrupted;
      outs.push_back(r);
    }
    if (outs.empty()) return;
    std::vector<Store::AttemptEnd> batch;
    for (Run* r : outs) {
      r->ended_at = std::max(Stamp(r->job.task), r->started_at);
      batch.push_back({r->job.task.id, r->n, &r->outcome, r->ended_at, r->ends});
    }
    std::vector<Status> stored;
    store_->FinishAttempts(batch, &stored);
    std::vector<Run*> recorded;
    for (size_t i = 0; i < outs.size(); ++i) {
      Run* r = outs[i];
      // One the batch could not write is retried alone until the store takes it.
      if (stored[i].code() == Status::Code::kFailedPrecondition) {
        // Another node ended this attempt (it declared this one lost): its outcome stays.
        LogWarn("task {}: the outcome of attempt {} is not recorded: {}", r->job.task.id, r->n,
                stored[i].message());
        continue;
      }
      if (!stored[i].ok()) {
        NoteStoreFailure(stored[i]);
        if (!Persist(
                fmt::format("task {}: recording the outcome of attempt {}", r->job.task.id, r->n),
                [&] {
                  return store_->FinishAttempt(r->job.task.id, r->n, r->outcome, r->ended_at,
                                               r->ends);
                }))
          continue;
      }
      recorded.push_back(r);
    }
    if (recorded.empty()) return;
    NoteStoreSuccess();
    on_outcome_();  // the learner reads the new outcomes from the store
    bool fallbacks = false;
    for (Run* r : recorded) {
      Job& job = r->job;
      if (metrics_) metrics_->AttemptEnded(r->expert->name(), r->outcome.kind);
      job.attempts = r->n;
      job.last_expert = r->expert->name();
      if (r->rerun)
        ++job.reruns;
      else
        ++job.next;
      // The task as the store has it now, for its waiters' answers.
      Attempt a;
      a.n = r->n;
      a.expert = job.last_expert;
      a.started_at = r->started_at;
      a.finished_at = r->ended_at;
      a.outcome = r->outcome;
      job.task.attempts.push_back(std::move(a));
      if (r->ends) {
        auto final = std::make_shared<Task>(std::move(job.task));
        final->state = *r->ends;
        final->updated_at = r->ended_at;
        final->expert = job.last_expert;
        final->decision = std::move(job.decision);
        const std::string id = final->id;
        const double took = final->created_at > 0 ? r->ended_at - final->created_at : -1;
        Ended(id, *r->ends, took, std::move(final));
        continue;
      }
      LogDebug("task {}: {} on {} ({}), falling back", job.task.id, ToString(r->outcome.kind),
               job.last_expert, r->outcome.error);
      // On to the next candidate when it has room (or to its end, if there is none).
      std::lock_guard<std::mutex> l(queue_mu_);
      job.recorded = false;
      ready_.push_front(std::move(job));
      fallbacks = true;
    }
    if (fallbacks) work_cv_.notify_all();
  }

  void EndTask(const Job& job, TaskState state) {
    const std::string& id = job.task.id;
    const double ended = Stamp(job.task);
    if (!Persist(fmt::format("task {}: recording its end", id),
                 [&] { return store_->FinishTask(id, state, job.last_expert, ended); }))
      return;
    Ended(id, state, job.task.created_at > 0 ? ended - job.task.created_at : -1);
  }

  // When something happens to task `t`: its creation stamp plus what the monotonic clock
  // measured since, where this process stamped it, so a wall clock stepped meanwhile
  // makes no duration negative and reorders nothing; otherwise (a task read back from the
  // store, another node's) the wall clock, never before the task's creation.
  double Stamp(const Task& t) {
    if (t.created_mono_us > 0)
      return t.created_at + std::max<int64_t>(0, env_->MonotonicMicros() - t.created_mono_us) / 1e6;
    return std::max(env_->NowUnix(), t.created_at);
  }

  // After a task's end is stored: its waiters are woken. `took`: its seconds from
  // creation to end (negative: unknown).
  void Ended(const std::string& id, TaskState state, double took,
             std::shared_ptr<const Task> final = nullptr) {
    if (state == TaskState::kCancelled) LogInfo("task {} cancelled", id);
    if (metrics_ && took >= 0) metrics_->TaskEnded(state, took);
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      cancels_.erase(id);
    }
    NotifyDone(id, std::move(final));
    if (cluster_) cluster_->Ended(id);  // a waiter on another node hears of it too
  }

  bool CancelRequested(const std::string& id) {
    std::lock_guard<std::mutex> l(queue_mu_);
    return cancels_.count(id) > 0;
  }

  // Retries a store write every second until it succeeds (true) or the grace period is
  // over (false): a full disk must not drop a task from memory. In a cluster a write for
  // a task another node took over fails for good (false) at once. `status` shows the error
  // meanwhile.
  bool Persist(const std::string& what, const std::function<Status()>& write) {
    for (int tries = 0;; ++tries) {
      Status st = write();
      if (st.ok()) {
        if (tries) LogInfo("{}: the store takes writes again", what);
        NoteStoreSuccess();
        return true;
      }
      if (st.code() == Status::Code::kFailedPrecondition) {  // another node's task now
        LogWarn("{}: {}", what, st.message());
        return false;
      }
      NoteStoreFailure(st);
      if (tries == 0) LogError("{}: {}; retrying every second", what, st.ToString());
      std::unique_lock<std::mutex> l(queue_mu_);
      if (queue_cv_.wait_for(l, std::chrono::seconds(1), [&] { return abort_.load(); }))
        return false;
    }
  }

  void NoteStoreFailure(const Status& st) {
    std::lock_guard<std::mutex> l(store_error_mu_);
    store_error_ = st.message();
  }
  void NoteStoreSuccess() {
    std::lock_guard<std::mutex> l(store_error_mu_);
    store_error_.clear();
  }
  // Why writes fail now (the file gone or replaced, or the last write's error), or null.
  json StoreError() {
    if (Status h = store_->Health(); !h.ok()) return h.message();
    std::lock_guard<std::mutex> l(store_error_mu_);
    return store_error_.empty() ? json(nullptr) : json(store_error_);
  }

  void NotifyDone(const std::string& id, std::shared_ptr<const Task> final) {
    std::vector<std::shared_ptr<Waiter>> ws;
    {
      std::lock_guard<std::mutex> l(waiters_mu_);
      live_.erase(id);
      auto it = waiters_.find(id);
      if (it != waiters_.end()) {
        ws = it->second;
        // Callbacks are taken out here: each runs once (WaitDone's threads remove theirs).
        auto& v = it->second;
        for (auto& w : v)
          if (w->on_end) w->claimed = true;
        v.erase(std::remove_if(v.begin(), v.end(), [](const auto& w) { return !!w->on_end; }),
                v.end());
        if (v.empty()) waiters_.erase(it);
      }
    }
    for (auto& w : ws) {
      if (w->on_end) {
        w->on_end(final);
        continue;
      }
      {
        std::lock_guard<std::mutex> l(w->mu);
        w->done = true;
        w->final = final;
      }
      w->cv.notify_all();
    }
  }

  bool Unwatch(const std::string& id, const std::shared_ptr<TaskWatch>& watch) {
    std::lock_guard<std::mutex> l(waiters_mu_);
    if (!watch || watch->claimed) return false;
    watch->claimed = true;
    auto it = waiters_.find(id);
    if (it != waiters_.end()) {
      auto& v = it->second;
      v.erase(std::remove(v.begin(), v.end(), watch), v.end());
      if (v.empty()) waiters_.erase(it);
    }
    return true;
  }

  // ---- a cluster -------------------------------------------------------------------

  // Jobs PickLocked found for experts only other nodes host go to the shared queue.
  void FlushReleases() {
    std::vector<Job> jobs;
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      jobs.swap(releases_);
    }
    if (jobs.empty()) return;
    std::vector<std::pair<std::string, std::string>> batch;
    for (const Job& j : jobs) batch.emplace_back(j.task.id, j.decision.candidates[j.next].expert);
    std::vector<Status> st;
    store_->Release(batch, &st);
    std::set<std::string> experts;
    std::vector<Job> again;
    for (size_t i = 0; i < jobs.size(); ++i) {
      if (st[i].ok()) {
        experts.insert(batch[i].second);
        // Not this node's any more: a cancel here goes to whichever node takes it (its
        // waiters stay, and hear of its end by notification).
        std::lock_guard<std::mutex> w(waiters_mu_);
        live_.erase(batch[i].first);
      } else if (st[i].code() == Status::Code::kFailedPrecondition) {
        LogWarn("task {}: {}", batch[i].first, st[i].message());
      } else {  // the store fails writes: it waits here, and is handed on later
        NoteStoreFailure(st[i]);
        again.push_back(std::move(jobs[i]));
      }
    }
    if (!again.empty()) {
      std::unique_lock<std::mutex> l(queue_mu_);
      for (Job& j : again) ready_.push_back(std::move(j));
      queue_cv_.wait_for(l, std::chrono::seconds(1), [&] { return stop_.load(); });
    }
    if (!experts.empty()) cluster_->Released({experts.begin(), experts.end()});
  }

  void SetRemote(std::vector<RemoteExpert> remote) {
    std::set<std::string> names;
    for (const auto& r : remote) names.insert(r.name);
    {
      std::lock_guard<std::mutex> r(remote_mu_);
      remote_profiles_.clear();  // manifests may have changed
      remote_ = std::move(remote);
    }
    bool changed;
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      changed = names != remote_names_;
      remote_names_ = std::move(names);
    }
    if (changed) Wake();  // jobs waiting for an expert that came or went
  }

  std::vector<std::pair<std::string, int>> FreeSlots() {
    auto experts = registry_->Active();
    std::map<std::string, int> waiting;
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      if (stop_.load()) return {};
      for (const auto& j : ready_)
        if (j.next < j.decision.candidates.size()) ++waiting[j.decision.candidates[j.next].expert];
    }
    std::vector<std::pair<std::string, int>> out;
    for (const auto& e : experts) {
      if (e->quarantined()) continue;
      const int free = e->manifest().capacity - e->inflight() - waiting[e->name()];
      if (free > 0) out.emplace_back(e->name(), free);
    }
    return out;
  }

  void Adopt(std::vector<Task> tasks, const std::string& want) {
    {
      std::lock_guard<std::mutex> w(waiters_mu_);
      for (const auto& t : tasks) live_.insert(t.id);
    }
    const uint64_t generation = registry_->generation();
    {
      std::lock_guard<std::mutex> l(queue_mu_);
      for (auto& t : tasks) {
        if (!t.decision) {
          queue_.push_back(std::move(t));
          continue;
        }
        Job job;
        job.decision = *t.decision;
        job.attempts = static_cast<int>(t.attempts.size());
        const auto& cands = job.decision.candidates;
        // On from the candidate after its last attempt's; the one it was queued for first.
        size_t from = 0;
        if (!t.attempts.empty()) {
          job.last_expert = t.attempts.back().expert;
          for (size_t i = 0; i < cands.size(); ++i)
            if (cands[i].expert == job.last_expert) from = i + 1;
        }
        job.next = from;
        for (size_t i = from; i < cands.size(); ++i)
          if (cands[i].expert == want) {
            job.next = i;
            break;
          }
        job.generation = generation;
        job.task = std::move(t);
        ready_.push_back(std::move(job));
      }
    }
    queue_cv_.notify_all();
    work_cv_.notify_all();
    RingARunner();
  }

  void RemoteEnded(const std::vector<std::string>& ids) {
    for (const auto& id : ids) {
      {
        std::lock_guard<std::mutex> l(waiters_mu_);
        if (!waiters_.count(id)) continue;  // nobody here waits for it
      }
      Task t;
      if (!store_->GetTask(id, &t).ok() || !IsFinal(t.state)) continue;
      NotifyDone(id, std::make_shared<const Task>(std::move(t)));
    }
  }

  std::string NewId() {
    std::lock_guard<std::mutex> l(id_mu_);
    static const char* hex = "0123456789abcdef";
    std::string s(12, '0');
    uint64_t r = id_rng_();
    for (char& c : s) c = hex[(r >>= 4) & 0xF];
    return s;
  }

  Store* const store_;
  ExpertRegistry* const registry_;
  const std::function<std::shared_ptr<Router>()> router_;
  Env* const env_;
  const std::function<void()> on_outcome_;
  const std::atomic<bool>& stop_;  // no new work
  const PipelineOptions options_;
  Metrics* const metrics_ = options_.metrics;
  std::atomic<int> max_attempts_live_{2};
  std::atomic<size_t> max_queued_{100000};
  // Tasks out of queue_ and ready_ yet not running, for the max_queued bound (queue_mu_):
  // the dispatcher's batch, and submits storing theirs.
  size_t routing_ = 0, admitting_ = 0;

  std::atomic<double> shutdown_grace_s_{10};
  std::mutex store_error_mu_;
  std::string store_error_;  // the last failed write's error, until one succeeds

  std::mutex profiles_mu_;
  std::map<std::string, SparseVector> profiles_;
  uint64_t profiles_generation_ = ~0ULL;

  std::mutex queue_mu_;
  std::condition_variable queue_cv_;  // the dispatcher, stops and retries wait here
  std::condition_variable work_cv_;   // idle workers wait here
  // Set (under queue_mu_) while routed jobs wait for a busy expert: only then does a freed
  // slot wake the workers.
  std::atomic<bool> slot_wanted_{false};
  bool requeued_ = false;    // PickLocked sent a job back to be routed (queue_mu_)
  std::deque<Task> queue_;   // stored, not yet routed
  std::deque<Job> ready_;    // routed, waiting for a worker
  std::deque<Job> started_;  // first attempt recorded on a slot it holds: next to run
  static constexpr size_t kMaxIntake = 256;  // tasks routed and stored together at most
  GroupQueue<Intake> intake_{kMaxIntake};    // submits waiting for their batch
  int busy_workers_ = 0;                     // workers running an attempt
  size_t running_ = 0;                       // attempts the busy workers run
  std::mutex runners_mu_;
  std::vector<std::shared_ptr<Bell>> runners_;  // workers running attempts (runners_mu_)
  int in_submit_ = 0;                           // threads inside Submit
  size_t undone_ = 0;  // attempts taken back at a stop (their tasks stay routed)
  std::thread dispatcher_;
  std::vector<std::thread> workers_;
  std::atomic<bool> abort_{false};  // grace period over: cancel running attempts
  // Guarded by queue_mu_: each running attempt's stop flag, and the tasks `cancel` asked
  // to end that were not in a queue at that moment.
  std::map<std::string, std::shared_ptr<std::atomic<bool>>> attempt_stops_;
  std::set<std::string> cancels_;

  std::mutex waiters_mu_;
  std::map<std::string, std::vector<std::shared_ptr<Waiter>>> waiters_;
  std::unordered_set<std::string> live_;  // tasks in the pipeline, not yet ended

  std::mutex id_mu_;
  std::mt19937_64 id_rng_{std::random_device{}()};

  // A cluster (SetCluster, before Start; null otherwise).
  ClusterHooks* cluster_ = nullptr;
  std::mutex remote_mu_;
  std::vector<RemoteExpert> remote_;                     // (remote_mu_)
  std::map<std::string, SparseVector> remote_profiles_;  // (remote_mu_)
  std::set<std::string> remote_names_;                   // (queue_mu_)
  std::vector<Job> releases_;  // for the shared queue (queue_mu_; FlushReleases)
};

Pipeline::Pipeline(Store* store, ExpertRegistry* registry,
                   std::function<std::shared_ptr<Router>()> router, Env* env,
                   std::function<void()> on_outcome, const std::atomic<bool>& stop,
                   PipelineOptions options)
    : impl_(std::make_unique<Impl>(store, registry, std::move(router), env, std::move(on_outcome),
                                   stop, options)) {}
Pipeline::~Pipeline() = default;
void Pipeline::Resume(std::vector<Task> tasks) { impl_->Resume(std::move(tasks)); }
void Pipeline::Start() { impl_->Start(); }
Status Pipeline::Submit(const std::string& text, const Tags& tags, double wait_s, std::string* id) {
  return impl_->Submit(text, tags, wait_s, id);
}
void Pipeline::SubmitMany(std::vector<Submission>* batch) { impl_->SubmitMany(batch); }
bool Pipeline::Unwatch(const std::string& id, const std::shared_ptr<TaskWatch>& watch) {
  return impl_->Unwatch(id, watch);
}
Status Pipeline::Route(const std::string& text, const Tags& tags, Decision* d) {
  return impl_->Route(text, tags, d);
}
Status Pipeline::Cancel(const std::string& id) { return impl_->Cancel(id); }
void Pipeline::CancelHere(const std::string& id) { (void)impl_->Cancel(id, false); }
Status Pipeline::WaitDone(const std::string& id, double timeout_s, Task* t, bool* done) {
  return impl_->WaitDone(id, timeout_s, t, done);
}
void Pipeline::SlotFreed() { impl_->SlotFreed(); }
void Pipeline::Wake() { impl_->Wake(); }
void Pipeline::SetLimits(size_t max_queued, int max_attempts, double shutdown_grace_s) {
  impl_->SetLimits(max_queued, max_attempts, shutdown_grace_s);
}
size_t Pipeline::QueueDepth() { return impl_->QueueDepth(); }
json Pipeline::StoreError() { return impl_->StoreError(); }
void Pipeline::StoreWritten() { impl_->NoteStoreSuccess(); }
void Pipeline::StopRouting() { impl_->StopRouting(); }
void Pipeline::StopRunning() { impl_->StopRunning(); }
size_t Pipeline::Left() { return impl_->Left(); }
void Pipeline::SetCluster(ClusterHooks* hooks) { impl_->cluster_ = hooks; }
void Pipeline::SetRemote(std::vector<RemoteExpert> remote) { impl_->SetRemote(std::move(remote)); }
std::vector<std::pair<std::string, int>> Pipeline::FreeSlots() { return impl_->FreeSlots(); }
void Pipeline::Adopt(std::vector<Task> tasks, const std::string& want) {
  impl_->Adopt(std::move(tasks), want);
}
void Pipeline::RemoteEnded(const std::vector<std::string>& ids) { impl_->RemoteEnded(ids); }

}  // namespace cortex
