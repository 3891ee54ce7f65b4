// A thin layer over libpq for the PostgreSQL store and the tests' server: a connection
// with its prepared statements, parameters in text form and results that free themselves.
// No exceptions; every failure is a Status.
#pragma once

#include <libpq-fe.h>

#include <initializer_list>
#include <memory>
#include <string>
#include <unordered_map>

#include "cortex/status.h"

namespace cortex::pg {

// One parameter of a statement, in PostgreSQL's text form (bytes in binary form).
struct Param {
  Param(const std::string& s);  // made valid UTF-8 without NULs: a text column takes no other
  Param(const char* s) : Param(std::string(s)) {}
  Param(double d);
  Param(int i) : v(std::to_string(i)) {}
  Param(long i) : v(std::to_string(i)) {}
  Param(bool b) : v(b ? "t" : "f") {}
  static Param Bytes(const std::string& b);
  std::string v;
  bool binary = false;
};

class Result {
 public:
  Result() = default;
  explicit Result(Status st) : st_(std::move(st)) {}
  Result(PGresult* r, Status st) : r_(r, PQclear), st_(std::move(st)) {}
  bool ok() const { return st_.ok(); }
  const Status& status() const { return st_; }
  int rows() const { return r_ ? PQntuples(r_.get()) : 0; }
  bool Null(int row, int col) const { return PQgetisnull(r_.get(), row, col) != 0; }
  std::string Text(int row, int col) const {
    return std::string(PQgetvalue(r_.get(), row, col),
                       static_cast<size_t>(PQgetlength(r_.get(), row, col)));
  }
  double Double(int row, int col) const;  // 0 for NULL
  long Long(int row, int col) const;      // 0 for NULL
  bool Bool(int row, int col) const {
    return !Null(row, col) && *PQgetvalue(r_.get(), row, col) == 't';
  }
  std::string Bytes(int row, int col) const;  // a bytea column
  long Affected() const;                      // rows an UPDATE/INSERT/DELETE changed
  std::string CommandTag() const { return r_ ? PQcmdStatus(r_.get()) : ""; }
  // The SQLSTATE of a failed statement ("" when it did not fail on the server).
  std::string SqlState() const;

 private:
  std::unique_ptr<PGresult, void (*)(PGresult*)> r_{nullptr, PQclear};
  Status st_;
};

class Conn {
 public:
  Conn() = default;
  Conn(const Conn&) = delete;
  Conn& operator=(const Conn&) = delete;
  ~Conn() { Close(); }

  // Connects to `url` (a libpq connection URI or key=value string); `purpose` names the
  // connection in errors and in pg_stat_activity. `short_transactions`: the server ends
  // this session if it sits idle inside a transaction for a second, so a node frozen
  // (SIGSTOP, a paused VM) between BEGIN and COMMIT cannot hold its row locks, and with
  // them every other node's reaping, for as long as it is frozen.
  Status Connect(const std::string& url, const std::string& purpose,
                 bool short_transactions = false);
  void Close();
  bool Broken() const { return !c_ || PQstatus(c_) != CONNECTION_OK; }
  // Reconnects a broken connection (its prepared statements are gone with it).
  Status Reset();
  // Statements without parameters, several allowed (BEGIN, COMMIT, a migration).
  Result Exec(const char* sql);
  // One statement, prepared on first use (cached by the SQL text's address: pass literals).
  Result Query(const char* sql, std::initializer_list<Param> params = {});
  // Whether a transaction is open (idle in one, or failed in one).
  PGTransactionStatusType TxStatus() const {
    return c_ ? PQtransactionStatus(c_) : PQTRANS_UNKNOWN;
  }
  PGconn* raw() const { return c_; }
  std::string Error() const;

 private:
  Result Check(PGresult* r);
  PGconn* c_ = nullptr;
  std::string url_, purpose_;
  bool short_transactions_ = false;
  std::unordered_map<const char*, std::pair<std::string, std::string>> prepared_;  // sql -> name
  int next_ = 0;
};

}  // namespace cortex::pg
