# cortex_embed(TARGET SYMBOL FILE): compiles FILE's text into TARGET as
# `cortex::embedded::SYMBOL` (a const char array), rebuilt when the file changes. Used for
# the script files of the HTML pages and for Chart.js itself, so that a page cortexctl
# writes needs nothing at run time: no network, no installed JavaScript.
set(CORTEX_EMBED_SCRIPT ${CMAKE_CURRENT_LIST_DIR}/embed_text.cmake)

function(cortex_embed target symbol file)
  set(out ${CMAKE_CURRENT_BINARY_DIR}/embedded/${symbol}.cc)
  add_custom_command(
    OUTPUT ${out}
    COMMAND ${CMAKE_COMMAND} -DIN=${file} -DOUT=${out} -DSYMBOL=${symbol} -P ${CORTEX_EMBED_SCRIPT}
    DEPENDS ${file} ${CORTEX_EMBED_SCRIPT}
    COMMENT "Embedding ${file}"
    VERBATIM)
  target_sources(${target} PRIVATE ${out})
endfunction()

# Chart.js from Debian's libjs-chart.js: the plots of `cortexctl report` and
# `cortex-bench replay --html`.
find_file(CORTEX_CHARTJS chart.min.js PATHS /usr/share/javascript/chart.js NO_DEFAULT_PATH)
if(NOT CORTEX_CHARTJS)
  message(FATAL_ERROR "Chart.js not found (/usr/share/javascript/chart.js/chart.min.js): "
                      "install Debian's libjs-chart.js (scripts/install-deps.sh does)")
endif()
