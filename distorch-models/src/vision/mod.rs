//! Image encoders: CLIP Vision and CLIP's image preprocessing.

pub mod clip_image;
pub mod clip_vision;
