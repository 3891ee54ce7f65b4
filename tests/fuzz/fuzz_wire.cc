// libFuzzer target: any request line reaches the socket server's parser and dispatcher
// (behind them an in-memory store and an empty expert registry) and gets a JSON answer.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "../../daemon/src/server.h"
#include "cortex/env.h"

namespace {

using json = nlohmann::json;

class FakeDaemon : public cortex::RequestHandler {
 public:
  FakeDaemon() : store_(cortex::OpenStore(":memory:").value()), registry_(Options()) {}
  const cortex::DaemonConfig& limits() const override { return cfg_; }
  cortex::Status Submit(const std::string& text, const cortex::Tags& tags, double,
                        std::string* id) override {
    cortex::Task t;
    t.id = "t" + std::to_string(next_++);
    t.text = text;
    t.tags = tags;
    *id = t.id;
    return store_->InsertTask(t);
  }
  void SubmitMany(std::vector<cortex::Submission>* batch) override {
    for (auto& s : *batch) s.result = Submit(s.text, s.tags, s.wait_s, &s.id);
  }
  bool Unwatch(const std::string&, const std::shared_ptr<cortex::TaskWatch>&) override {
    return false;
  }
  bool Stopping() const override { return false; }
  cortex::Status Route(const std::string&, const cortex::Tags&, cortex::Decision* d) override {
    d->chosen = "x";
    d->candidates.resize(1);
    d->candidates[0].expert = "x";
    return cortex::Status::OK();
  }
  cortex::Status WaitDone(const std::string& id, double, cortex::Task* t, bool* done) override {
    *done = false;
    return store_->GetTask(id, t);
  }
  cortex::Status Cancel(const std::string&) override { return cortex::Status::OK(); }
  cortex::Store* store() override { return store_.get(); }
  cortex::ExpertRegistry* registry() override { return &registry_; }
  json Status_() override { return {{"ok", true}}; }
  cortex::Status Reload(json* s) override {
    *s = json::object();
    return cortex::Status::OK();
  }
  cortex::Status Retrain(bool, const std::function<bool(const std::string&)>& progress,
                         json* r) override {
    progress("training");
    *r = json::object();
    return cortex::Status::OK();
  }
  cortex::Status Models(json* r) override {
    *r = json::array();
    return cortex::Status::OK();
  }
  cortex::Status Feedback(const std::string& id, const cortex::Feedback& f, json* r) override {
    cortex::FeedbackResult out;
    cortex::Status s = store_->AddFeedback(id, f, 0, &out);
    if (s.ok()) *r = json::object();
    return s;
  }
  cortex::Status Explain(const cortex::Task&, json* r) override {
    *r = json::object();
    return cortex::Status::OK();
  }
  cortex::Status Rollback(int v, bool, json*) override {
    return cortex::Status::NotFound("no model version " + std::to_string(v));
  }

 private:
  static cortex::ExpertRegistry::Options Options() {
    cortex::ExpertRegistry::Options o;
    o.env = cortex::Env::Default();
    return o;
  }
  cortex::DaemonConfig cfg_;
  std::unique_ptr<cortex::Store> store_;
  cortex::ExpertRegistry registry_;
  long next_ = 0;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static FakeDaemon* daemon = new FakeDaemon();
  static cortex::Server* server = new cortex::Server(daemon, cortex::ServerLimits{});
  json r = server->HandleLine(std::string(reinterpret_cast<const char*>(data), size),
                              [](const std::string&) { return true; });
  // Every answer is an object saying ok or carrying an error.
  if (!r.is_object() || !r.contains("ok")) std::abort();
  if (!r["ok"].get<bool>() && !r.contains("error")) std::abort();
  (void)r.dump();  // and it serialises (no invalid UTF-8 smuggled into it)
  return 0;
}
