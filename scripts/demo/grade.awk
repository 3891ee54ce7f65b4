# The demo's simulated grader: the program each role expert of scripts/demo/cortex.yaml
# runs (a `command` expert), as
#   awk -v role=ROLE -f grade.awk SAMPLE.tsv
# with the task's text in CORTEX_TASK_TEXT, as the command expert passes it.
#
# It looks the text up in the shipped sample (the router never sees this file or the
# commit's type: the lookup happens here, in the expert, after the router has chosen) and
# exits 0, a success, only when the commit's real Conventional Commit type maps to ROLE;
# otherwise it exits 1, a failure, and the task falls back to the router's runner-up.
#
# The mapping is bench/replay.cc's (the corpus README's). Types outside it (style and
# revert; 8 of the 3,000 rows) count as maintenance: formatting and reverts are upkeep.
# A subject that occurs more than once is graded by the role most of its rows map to,
# ties going to the earliest row, so one text always has one right role ("update all
# non-major dependencies": 76 chore, 2 fix, so maintenance).
# One awk process over a 240 KB file: about 2 ms a call on its own, 6-9 ms as an attempt
# on a busy 2-core machine (the plugin host spawns it and collects its output).
BEGIN {
  FS = "\t"
  text = ENVIRON["CORTEX_TASK_TEXT"]
  split("fix bugfix feat feature docs docs build cicd ci cicd test testing perf performance refactor refactor chore maintenance", m, " ")
  for (i = 1; i < 18; i += 2) map[m[i]] = m[i + 1]
}
NR > 1 && $5 == text {
  r = ($3 in map) ? map[$3] : "maintenance"
  if (!(r in count)) order[++k] = r
  count[r]++
  n++
  if (!(r in first)) first[r] = $1 " (" $3 ")"
}
END {
  if (k == 0) {
    print "grader: this text is not in the demo sample; nothing to grade"
    exit 1
  }
  same = n > 1 ? " (one of " n " commits with this subject)" : ""
  best = order[1]
  for (i = 2; i <= k; i++)
    if (count[order[i]] > count[best]) best = order[i]
  if (best == role) {
    print "grader: commit " first[best] same " is " best " work: success for the " role " expert"
    exit 0
  }
  print "grader: commit " first[best] same " is " best " work, not " role ": failure"
  exit 1
}
