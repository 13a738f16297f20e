//! A program path's outcome (a verdict, or the reason to drop) as it crosses a BPF-to-BPF call:
//! one register, r0, since BPF functions return nothing larger.
use maps_common::DropReason;

/// The verdict, or -1 - the drop reason.
#[inline(always)]
pub fn encode(outcome: Result<i32, DropReason>) -> i64 {
    match outcome {
        Ok(action) => action as i64,
        Err(reason) => -1 - reason as i64,
    }
}

/// The outcome `encode` gave.
#[inline(always)]
pub fn decode(code: i64) -> Result<i32, DropReason> {
    let reason = (-1 - code) as u32;
    if code >= 0 {
        Ok(code as i32)
    } else if reason < DropReason::COUNT {
        // SAFETY: DropReason is repr(u32) with the values 0..COUNT, and this one is below.
        Err(unsafe { core::mem::transmute::<u32, DropReason>(reason) })
    } else {
        Err(DropReason::AdjustFailed)
    }
}
