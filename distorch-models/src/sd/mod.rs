//! Stable Diffusion 1.x/2.x/SDXL: the UNet, the ControlNet, the VAE, single-file checkpoints
//! and the txt2img pipeline.

pub mod checkpoint;
pub mod controlnet;
pub mod demo;
pub mod load;
pub mod pipeline;
pub mod unet;
pub mod vae;

pub use family::SdFamily;

mod family {
    /// What a UNet's shapes say it is; it picks what the shapes cannot tell (the VAE's scaling
    /// factor, the text encoder layer SD 2.x conditions on).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[non_exhaustive]
    pub enum SdFamily {
        /// SD 1.x: 768-wide context, 8 heads.
        Sd1,
        /// SD 2.x: 1024-wide context (OpenCLIP-H), 64-wide heads.
        Sd2,
        /// SDXL base: 2048-wide context (CLIP-L + OpenCLIP-bigG), text-time embedding.
        Sdxl,
        /// SDXL refiner: 1280-wide context (OpenCLIP-bigG alone), text-time embedding.
        SdxlRefiner,
        /// Shapes that follow none of them (heads and norm groups are guessed).
        Unknown,
    }

    impl SdFamily {
        /// Its name, for people: `SD 1.x`, `SD 2.x`, `SDXL`, `SDXL refiner`, or `unknown`.
        pub fn name(self) -> &'static str {
            match self {
                SdFamily::Sd1 => "SD 1.x",
                SdFamily::Sd2 => "SD 2.x",
                SdFamily::Sdxl => "SDXL",
                SdFamily::SdxlRefiner => "SDXL refiner",
                SdFamily::Unknown => "unknown",
            }
        }

        /// Whether it is SDXL (base or refiner).
        pub fn is_sdxl(self) -> bool {
            matches!(self, SdFamily::Sdxl | SdFamily::SdxlRefiner)
        }

        /// The VAE's latent scaling factor: SDXL's 0.13025, else SD's 0.18215.
        pub fn vae_scaling_factor(self) -> f64 {
            if self.is_sdxl() { 0.13025 } else { 0.18215 }
        }

        /// Whether the UNet is conditioned on the text encoder's penultimate layer through its
        /// final norm (SD 2.x: the single-file OpenCLIP encoder has all 24 layers, diffusers
        /// drops the last one).
        pub fn penultimate_text_layer(self) -> bool {
            self == SdFamily::Sd2
        }
    }

    impl std::fmt::Display for SdFamily {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.name())
        }
    }
}
