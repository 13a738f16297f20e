//! Helpers shared by the namespace and BPF_PROG_TEST_RUN tests.
