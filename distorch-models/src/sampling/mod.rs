//! Samplers: the Stable Diffusion schedulers (Euler, Euler ancestral, DDIM, DPM++ 2M) and
//! flow-matching Euler (Wan).

pub mod flow_match;
pub mod scheduler;
