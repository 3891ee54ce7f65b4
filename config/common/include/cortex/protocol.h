// The operations of cortexd's socket protocol, defined once: the server's dispatch (a
// switch on Op, so an operation without a handler does not compile cleanly), the fields
// each takes, the list an unknown operation is answered with, and cortexctl's commands
// with their help all come from this table (the shapes of requests and answers:
// daemon/include/cortex/wire.h and docs/ARCHITECTURE.md).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace cortex {

enum class Op {
  kSubmit,
  kRoute,
  kWait,
  kCancel,
  kShow,
  kHistory,
  kExport,
  kExperts,
  kRelease,
  kConfidence,
  kEvents,
  kFeedback,
  kReload,
  kStatus,
  kRetrain,
  kModels,
  kReport,
  kExplain,
  kRollback,  // the last: tests count the Ops up to it
};

struct WireOp {
  Op id;
  const char* name;                 // the request's "op"
  std::vector<const char*> fields;  // what a request may carry besides "op"
  const char* command;              // the cortexctl command that sends it ("models rollback")
  const char* help;                 // one line: that command's help
};

// Every operation, in the order help lists them.
const std::vector<WireOp>& WireOps();
// The operation called `name`, or null.
const WireOp* FindWireOp(std::string_view name);
// The operation with this id (every Op has one).
const WireOp& WireOpOf(Op id);
// "submit, route, ...": every operation's name, for messages.
std::string WireOpNames();

}  // namespace cortex
