# cmake -DSCDOC=... -DIN=page.scd -DOUT=page -P CortexScdoc.cmake
# Runs scdoc (which reads stdin and writes stdout) and writes OUT only when it succeeded,
# so a failed page never looks up to date.
execute_process(COMMAND ${SCDOC} INPUT_FILE ${IN} OUTPUT_FILE ${OUT}.tmp
                ERROR_VARIABLE err RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  file(REMOVE ${OUT}.tmp)
  message(FATAL_ERROR "scdoc failed on ${IN}:\n${err}")
endif()
file(RENAME ${OUT}.tmp ${OUT})
