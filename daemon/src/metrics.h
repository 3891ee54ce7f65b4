// Prometheus metrics (SPEC "Metrics"): counters and histograms that the pipeline and the
// trainer update as things happen, rendered in the text exposition format together with
// gauges read at scrape time; served at /metrics by cpp-httplib when metrics.listen is
// set (a loopback address only: config.cc refuses any other).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cortex/status.h"
#include "cortex/types.h"

namespace cortex {

class Metrics {
 public:
  Metrics();
  void Admitted(size_t tasks);  // cortex_tasks_total{state="queued"}
  void Routed(const std::vector<Decision>& decisions, double seconds);  // per batch
  void AttemptEnded(const std::string& expert, OutcomeKind kind);
  void TaskEnded(TaskState state, double seconds);  // seconds: submit to finish
  void Retrained(const std::string& verdict);       // promoted, refused, error

  // The exposition: every metric family this object keeps, then `gauges` (lines the
  // caller read just now, with their HELP and TYPE).
  std::string Render(const std::string& gauges) const;

  // Pieces of the exposition, for Render and for the gauges a caller adds: a family's
  // HELP and TYPE lines, and one sample line "name{label=\"value\",...} value" with the
  // label values escaped as the format requires.
  using Labels = std::vector<std::pair<std::string, std::string>>;
  static void Family(std::string* out, const char* name, const char* type, const char* help);
  template <class V>
  static void Sample(std::string* out, const std::string& name, const Labels& labels, V value) {
    *out += Series(name, labels) + " " + std::to_string(value) + "\n";
  }

 private:
  static std::string Series(const std::string& name, const Labels& labels);
  struct Histogram {
    std::vector<double> bounds;  // upper bounds, ascending; +Inf implied
    std::vector<unsigned long> counts;
    double sum = 0;
    unsigned long count = 0;
    void Observe(double v, unsigned long n = 1);
  };
  mutable std::mutex mu_;
  std::map<std::string, unsigned long> tasks_;                             // by state
  std::map<std::pair<std::string, bool>, unsigned long> decided_;          // by expert, explored
  std::map<std::pair<std::string, std::string>, unsigned long> attempts_;  // expert, outcome
  std::map<std::string, unsigned long> retrains_;                          // by verdict
  Histogram task_duration_, route_duration_;
};

// An HTTP endpoint serving `render()` at /metrics (and nothing else) on its own thread.
class MetricsServer {
 public:
  static Result<std::unique_ptr<MetricsServer>> Start(const std::string& host, int port,
                                                      std::function<std::string()> render);
  ~MetricsServer();
  // Serves no more (idempotent): the render function is not called again once it returns.
  void Stop();
  std::string address() const;  // host:port as bound (port 0 asked: the one given)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  MetricsServer();
};

}  // namespace cortex
