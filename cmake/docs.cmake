# API reference: `cmake --build build --target docs` runs Doxygen (Debian package doxygen)
# into build/docs/html; warnings go to build/doxygen-warnings.log and fail the target.
find_package(Doxygen QUIET)
if(DOXYGEN_FOUND)
  configure_file(${PROJECT_SOURCE_DIR}/docs/Doxyfile.in ${PROJECT_BINARY_DIR}/Doxyfile @ONLY)
  add_custom_target(docs
    COMMAND ${CMAKE_COMMAND} -E remove -f ${PROJECT_BINARY_DIR}/doxygen-warnings.log
    COMMAND ${DOXYGEN_EXECUTABLE} ${PROJECT_BINARY_DIR}/Doxyfile
    COMMAND ${CMAKE_COMMAND} -DLOG=${PROJECT_BINARY_DIR}/doxygen-warnings.log -P ${PROJECT_SOURCE_DIR}/cmake/check_empty_log.cmake
    WORKING_DIRECTORY ${PROJECT_BINARY_DIR}
    COMMENT "Doxygen: API reference in ${PROJECT_BINARY_DIR}/docs/html"
    VERBATIM)
endif()
