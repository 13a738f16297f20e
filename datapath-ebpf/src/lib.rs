//! Exists so cargo sees a library target and rebuilds the agent's embedded object on change.
#![no_std]
