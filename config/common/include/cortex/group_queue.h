// Group commit as a reusable queue (after leveldb's DBImpl::Write): callers add items; the
// caller whose item reaches the front leads — it takes every item queued so far (up to
// `max_group`), does the work for all of them at once, then tells each one and hands the
// lead to the next in line. Nobody hands work to another thread: a follower just waits,
// on its own mutex, so the end of a group wakes each follower once and none queues for a
// shared lock again. Work may hand the lead on before it is done (its group still waits
// for it), so that the next group's first steps overlap this one's last. The group's
// first item is the leader's own. Used by the store's writers and by the daemon's intake.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <utility>
#include <vector>

namespace cortex {

template <typename T>
class GroupQueue {
 public:
  // `hand_on` (callable once; later calls do nothing) lets the next group start.
  using Work =
      std::function<void(const std::vector<T*>& group, const std::function<void()>& hand_on)>;

  explicit GroupQueue(size_t max_group) : max_group_(max_group) {}

  // Queues `items` and returns once `work` has run over each of them (on this thread or
  // on another caller's, in groups of queued items, oldest first).
  void Run(const std::vector<T*>& items, const Work& work) {
    if (items.empty()) return;
    std::vector<Member> mine(items.size());
    {
      std::lock_guard<std::mutex> q(mu_);
      for (size_t i = 0; i < items.size(); ++i) {
        mine[i].item = items[i];
        queue_.push_back(&mine[i]);
      }
      // A group stays queued until it is done: at the front means nobody leads now.
      if (queue_.front() == &mine[0]) mine[0].state = kLead;
    }
    std::exception_ptr error;  // from a group this caller led; the rest still go through
    for (Member& m : mine) {
      State st;
      {
        std::unique_lock<std::mutex> l(m.mu);
        m.cv.wait(l, [&] { return m.state != kWait; });
        st = m.state;
      }
      if (st != kLead) continue;
      try {
        Lead(work);
      } catch (...) {
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
  }

 private:
  enum State { kWait, kLead, kDone };
  struct Member {
    T* item = nullptr;
    State state = kWait;
    std::mutex mu;
    std::condition_variable cv;
  };

  void Lead(const Work& work) {
    std::vector<Member*> group;
    {
      std::lock_guard<std::mutex> q(mu_);
      group.assign(queue_.begin(),
                   queue_.begin() + static_cast<long>(std::min(queue_.size(), max_group_)));
    }
    std::vector<T*> items;
    for (Member* m : group) items.push_back(m->item);
    bool handed = false;
    const std::function<void()> hand_on = [&] {
      if (std::exchange(handed, true)) return;
      Member* next = nullptr;
      {
        std::lock_guard<std::mutex> q(mu_);
        queue_.erase(queue_.begin(), queue_.begin() + static_cast<long>(group.size()));
        if (!queue_.empty()) next = queue_.front();
      }
      if (next) {  // it waits: only this leader can change its state
        std::lock_guard<std::mutex> l(next->mu);
        next->state = kLead;
        next->cv.notify_one();
      }
    };
    // Whatever `work` does, the group is told and the lead handed on: a throw must not
    // leave followers waiting for ever. (Items keep what work set; callers start them as
    // failed.) The exception goes on to this caller.
    std::exception_ptr error;
    try {
      work(items, hand_on);
    } catch (...) {
      error = std::current_exception();
    }
    hand_on();
    // Under each member's own mutex: once told, its caller may return and it is gone.
    for (Member* m : group) {
      std::lock_guard<std::mutex> l(m->mu);
      m->state = kDone;
      m->cv.notify_one();
    }
    if (error) std::rethrow_exception(error);
  }

  const size_t max_group_;
  std::mutex mu_;
  std::deque<Member*> queue_;  // waiting or in the group being done, oldest first
};

}  // namespace cortex
