#include "metrics.h"

#include <httplib.h>

#include <fmt/format.h>

#include <pthread.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

namespace cortex {

namespace {

std::vector<double> Bounds(std::initializer_list<double> b) { return b; }

std::string Escape(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"')
      out += '\\', out += c;
    else if (c == '\n')
      out += "\\n";
    else
      out += c;
  }
  return out;
}

}  // namespace

void Metrics::Family(std::string* out, const char* name, const char* type, const char* help) {
  *out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

std::string Metrics::Series(const std::string& name, const Labels& labels) {
  std::string s = name;
  if (labels.empty()) return s;
  s += '{';
  for (size_t i = 0; i < labels.size(); ++i)
    s += (i ? "," : "") + labels[i].first + "=\"" + Escape(labels[i].second) + "\"";
  return s + '}';
}

void Metrics::Histogram::Observe(double v, unsigned long n) {
  for (size_t i = 0; i < bounds.size(); ++i)
    if (v <= bounds[i]) {
      counts[i] += n;
      break;
    }
  sum += v * static_cast<double>(n);
  count += n;
}

Metrics::Metrics() {
  // From a no-op expert's millisecond to a long agent run; routing is microseconds.
  task_duration_.bounds = Bounds({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                                  5, 10, 30, 60, 300, 900, 3600});
  route_duration_.bounds =
      Bounds({1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1, 1});
  for (Histogram* h : {&task_duration_, &route_duration_}) h->counts.assign(h->bounds.size(), 0);
}

void Metrics::Admitted(size_t tasks) {
  std::lock_guard<std::mutex> l(mu_);
  tasks_["queued"] += tasks;
}

void Metrics::Routed(const std::vector<Decision>& decisions, double seconds) {
  std::lock_guard<std::mutex> l(mu_);
  for (const Decision& d : decisions) ++decided_[{d.chosen, d.explored}];
  // A batch is routed at once: each of its tasks took the batch's time.
  route_duration_.Observe(seconds, decisions.size());
}

void Metrics::AttemptEnded(const std::string& expert, OutcomeKind kind) {
  std::lock_guard<std::mutex> l(mu_);
  ++attempts_[{expert, ToString(kind)}];
}

void Metrics::TaskEnded(TaskState state, double seconds) {
  std::lock_guard<std::mutex> l(mu_);
  ++tasks_[ToString(state)];
  task_duration_.Observe(std::max(0.0, seconds));
}

void Metrics::Retrained(const std::string& verdict) {
  std::lock_guard<std::mutex> l(mu_);
  ++retrains_[verdict];
}

std::string Metrics::Render(const std::string& gauges) const {
  std::string out;
  std::lock_guard<std::mutex> l(mu_);
  Family(
      &out, "cortex_tasks_total", "counter",
      "Tasks accepted (state=\"queued\") and tasks ended, by final state, since cortexd started.");
  for (const char* s : {"queued", "succeeded", "failed", "cancelled", "interrupted"}) {
    auto it = tasks_.find(s);
    Sample(&out, "cortex_tasks_total", {{"state", s}}, it == tasks_.end() ? 0ul : it->second);
  }
  Family(&out, "cortex_decisions_total", "counter",
         "Routing decisions by the expert chosen and whether the choice explored.");
  for (const auto& [k, n] : decided_)
    Sample(&out, "cortex_decisions_total",
           {{"expert", k.first}, {"explored", k.second ? "true" : "false"}}, n);
  Family(&out, "cortex_attempts_total", "counter", "Finished attempts by expert and outcome.");
  for (const auto& [k, n] : attempts_)
    Sample(&out, "cortex_attempts_total", {{"expert", k.first}, {"outcome", k.second}}, n);
  Family(&out, "cortex_retrains_total", "counter",
         "Retrains by verdict: promoted, refused (validation), error.");
  for (const char* v : {"promoted", "refused", "error"}) {
    auto it = retrains_.find(v);
    Sample(&out, "cortex_retrains_total", {{"verdict", v}},
           it == retrains_.end() ? 0ul : it->second);
  }
  auto histogram = [&](const char* name, const char* help, const Histogram& h) {
    Family(&out, name, "histogram", help);
    unsigned long cumulative = 0;
    for (size_t i = 0; i < h.bounds.size(); ++i) {
      cumulative += h.counts[i];
      out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, h.bounds[i], cumulative);
    }
    out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, h.count, name,
                       h.sum, name, h.count);
  };
  histogram("cortex_task_duration_seconds", "Time from submit to the task's end.", task_duration_);
  histogram("cortex_route_duration_seconds", "Time to route a task (its batch's routing time).",
            route_duration_);
  return out + gauges;
}

namespace {

// httplib's request workers, bounded both ways: at most kWorkers requests at a time and
// kWaiting accepted connections waiting; past that, enqueue blocks the accept loop, so
// further connections wait in the kernel's backlog holding none of cortexd's descriptors
// (a flood of idle connections cannot use up its files). Workers keep the state alive
// through a shared pointer, so one held by a client that trickles its request can be
// left behind at a stop instead of holding the stop up.
class BoundedQueue : public httplib::TaskQueue {
 public:
  static constexpr size_t kWorkers = 4, kWaiting = 16;
  struct State {
    std::mutex mu;
    std::condition_variable work, space, idle;
    std::deque<std::function<void()>> jobs;
    size_t busy = 0;
    bool closing = false;
  };
  explicit BoundedQueue(std::shared_ptr<State> st) : st_(std::move(st)) {
    for (size_t i = 0; i < kWorkers; ++i)
      std::thread([st = st_] {
        pthread_setname_np(pthread_self(), "metrics");
        std::unique_lock<std::mutex> l(st->mu);
        for (;;) {
          st->work.wait(l, [&] { return !st->jobs.empty() || st->closing; });
          if (st->closing) break;
          auto fn = std::move(st->jobs.front());
          st->jobs.pop_front();
          ++st->busy;
          st->space.notify_one();
          l.unlock();
          fn();
          l.lock();
          --st->busy;
          st->idle.notify_all();
        }
      }).detach();
  }
  void enqueue(std::function<void()> fn) override {
    std::unique_lock<std::mutex> l(st_->mu);
    st_->space.wait(l, [&] { return st_->jobs.size() < kWaiting || st_->closing; });
    if (st_->closing) return;  // stopping: the connection goes with the process
    st_->jobs.push_back(std::move(fn));
    st_->work.notify_one();
  }
  // The accept loop is over. Requests in progress get a moment to finish; one still held
  // after that is left to its worker (see ~MetricsServer).
  void shutdown() override {
    std::unique_lock<std::mutex> l(st_->mu);
    st_->closing = true;
    st_->jobs.clear();
    st_->work.notify_all();
    st_->space.notify_all();
    st_->idle.wait_for(l, std::chrono::seconds(1), [&] { return st_->busy == 0; });
  }

 private:
  std::shared_ptr<State> st_;
};

}  // namespace

struct MetricsServer::Impl {
  httplib::Server http;
  std::thread thread;
  std::string host;
  int port = 0;
  std::shared_ptr<BoundedQueue::State> queue = std::make_shared<BoundedQueue::State>();
  // The scrape's view of cortexd, closed at the stop: a request a worker still holds
  // then gets nothing from a daemon that is going away.
  std::mutex gate_mu;
  std::function<std::string()> render;
};

MetricsServer::MetricsServer() : impl_(std::make_unique<Impl>()) {}

Result<std::unique_ptr<MetricsServer>> MetricsServer::Start(const std::string& host, int port,
                                                            std::function<std::string()> render) {
  std::unique_ptr<MetricsServer> s(new MetricsServer());
  Impl& m = *s->impl_;
  m.render = std::move(render);
  m.http.Get("/metrics", [&m](const httplib::Request& req, httplib::Response& res) {
    if (!req.ranges.empty()) {  // (httplib would build every range asked for in memory)
      res.status = 416;
      return;
    }
    std::lock_guard<std::mutex> l(m.gate_mu);
    if (!m.render) {
      res.status = 503;
      return;
    }
    res.set_content(m.render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  // Anything else: a short pointer to the one path there is.
  m.http.set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (res.status == 404) res.set_content("cortexd serves /metrics only\n", "text/plain");
  });
  m.http.new_task_queue = [q = m.queue] { return new BoundedQueue(q); };
  // One request per connection, and a client that stops sending is dropped soon.
  m.http.set_keep_alive_max_count(1);
  m.http.set_read_timeout(2);
  m.http.set_write_timeout(2);
  m.http.set_payload_max_length(4096);
  // Not httplib's default, which adds SO_REUSEPORT: a second cortexd on the same port
  // would then share it silently and scrapes would alternate between the two.
  m.http.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });
  const int bound = port == 0                         ? m.http.bind_to_any_port(host)
                    : m.http.bind_to_port(host, port) ? port
                                                      : -1;
  if (bound <= 0)
    return Status::Unavailable(fmt::format("cannot listen on {}:{} ({}); is the port taken?", host,
                                           port, std::strerror(errno)));
  m.host = host;
  m.port = bound;
  m.thread = std::thread([&m] {
    pthread_setname_np(pthread_self(), "metrics");
    m.http.listen_after_bind();
  });
  return s;
}

void MetricsServer::Stop() {
  {
    std::lock_guard<std::mutex> l(impl_->gate_mu);
    impl_->render = nullptr;
  }
  impl_->http.stop();
  if (impl_->thread.joinable()) impl_->thread.join();  // BoundedQueue::shutdown: at most 1 s
}

MetricsServer::~MetricsServer() {
  Stop();
  std::lock_guard<std::mutex> l(impl_->queue->mu);
  // A worker still inside a request uses the server: it is left running, and the server
  // with it, until the process ends (a stop, the only time this runs).
  if (impl_->queue->busy > 0) (void)impl_.release();
}

std::string MetricsServer::address() const {
  const bool v6 = impl_->host.find(':') != std::string::npos;
  return (v6 ? "[" + impl_->host + "]" : impl_->host) + ":" + std::to_string(impl_->port);
}

}  // namespace cortex
