//! Decoding and the reference preprocessing, torchvision's transform on PIL images:
//! `Resize(resize, bilinear|bicubic, antialias) -> CenterCrop(crop) -> ToTensor -> Normalize(mean, std)`
//! with the numbers of the model's profile (`core::Preprocess`: torchvision's ResNet50, CLIP, or
//! declared), applied to the image converted to RGB as PIL's `convert("RGB")` does (alpha dropped,
//! grey replicated). JPEGs are decoded by libjpeg-turbo, as in PIL; PNG, WebP and the rare CMYK
//! JPEG by image-rs. The resize is a separable convolution whose support widens with the downscale
//! factor, which is what PIL does and what `fast_image_resize`'s convolutions implement (its
//! Catmull-Rom is PIL's bicubic).

use std::io::Cursor;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

use super::jpeg;
use crate::core::{Preprocess, ResizeFilter};

/// The flattest shape the resize accepts: the shorter side becomes `resize`, so a 1x1,000,000
/// PNG of 2 KB would otherwise resize to 256 x 256,000,000 pixels (gigabytes). Panoramas are
/// 2:1 to 12:1. At torchvision's 256, the resize makes at most 2 MP (6 MB of RGB).
pub const MAX_ASPECT: u64 = 32;

/// Guards against hostile or accidental inputs, and how JPEGs are decoded.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Most pixels a decoded image may have (width x height). The header is read first, so a
    /// decompression bomb is refused before anything is allocated for it.
    pub max_pixels: u64,
    /// Decode JPEGs of at least twice the resize target at 1/2, 1/4 or 1/8 scale in the DCT
    /// domain (as libjpeg-turbo's scaled decoding and PIL's draft mode do): much less work for
    /// large photos, slightly different pixels. Off by default: the exact path matches torchvision.
    pub fast_jpeg: bool,
    /// JPEGs above this many pixels are decoded at a DCT scale even without `fast_jpeg`, keeping
    /// the shorter side at 512 or more (twice the resize target, so the antialiased resize still
    /// filters): an 8000x8000 photo decodes to 1000x1000 (3 MB) instead of 192 MB, for embeddings
    /// that differ from the exact path's by about a grey level.
    pub exact_max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // PIL refuses above 2 x 89.5 MP; 64 MP covers any camera.
        Self { max_pixels: 64_000_000, fast_jpeg: false, exact_max_pixels: 16_000_000 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a supported image (JPEG, PNG or WebP expected)")]
    Unsupported,
    #[error("image is {width}x{height} = {pixels} pixels, more than the limit of {limit}")]
    TooLarge { width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("image has no pixels")]
    Empty,
    #[error(
        "image is {width}x{height}: with its shorter side at {side} it would be {resized} pixels, more than \
         the limit of {limit} (an aspect ratio above {MAX_ASPECT}:1)"
    )]
    BadShape { width: u32, height: u32, side: u32, resized: u64, limit: u64 },
    #[error("corrupt {format} image: {reason}")]
    Corrupt { format: &'static str, reason: String },
    #[error("truncated JPEG image: the data ends before the end-of-image marker")]
    TruncatedJpeg,
    #[error("decoding it takes {} MB, more than the decode memory budget of {} MB", needed >> 20, budget >> 20)]
    OverBudget { needed: u64, budget: u64 },
}

/// Sniffs the format from the bytes (never the file name) and returns it if we decode it.
pub fn sniff(bytes: &[u8]) -> Option<ImageFormat> {
    match image::guess_format(bytes).ok()? {
        f @ (ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) => Some(f),
        _ => None,
    }
}

/// Decodes JPEG, PNG or WebP bytes to RGB8, applying the EXIF orientation.
/// Large JPEGs come at the DCT scale torchvision's profile would decode them at (`DecodeLimits`).
pub fn decode(bytes: &[u8], limits: DecodeLimits) -> Result<RgbImage, DecodeError> {
    let mut p = Preprocessor::default();
    let (w, h) = p.decode(bytes, limits, Preprocess::TORCHVISION.resize)?;
    Ok(RgbImage::from_raw(w, h, p.rgb).expect("decoders fill width x height x 3 bytes"))
}

/// Refuses an image without pixels or with more than the limit, from its header's size: before
/// anything is allocated for it. (Too flat a shape is refused by `resized_size`, before the resize.)
fn check_size(width: u32, height: u32, limits: DecodeLimits) -> Result<(), DecodeError> {
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(DecodeError::Empty);
    }
    if pixels > limits.max_pixels {
        return Err(DecodeError::TooLarge { width, height, pixels, limit: limits.max_pixels });
    }
    Ok(())
}

/// The DCT scale for `--fast-jpeg`: the smallest of 1/2, 1/4, 1/8 that still leaves the shorter
/// side at `resize` or more, so the antialiased resize after it still does the final step.
fn dct_denominator(short_side: u32, resize: u32) -> u32 {
    [8, 4, 2].into_iter().find(|&d| short_side / d >= resize).unwrap_or(1)
}

/// The DCT scale a JPEG of this size is decoded at for a resize to `resize` (see `DecodeLimits`).
fn jpeg_denominator(width: u32, height: u32, limits: DecodeLimits, resize: u32) -> u32 {
    let short = width.min(height);
    if limits.fast_jpeg {
        dct_denominator(short, resize)
    } else if u64::from(width) * u64::from(height) > limits.exact_max_pixels {
        [8, 4, 2].into_iter().find(|&d| short / d >= 2 * resize).unwrap_or(1)
    } else {
        1
    }
}

/// A JPEG's frame header (SOFn): (width, height, components, progressive).
fn jpeg_frame(b: &[u8]) -> Option<(u32, u32, u8, bool)> {
    let (code, p) = jpeg_markers(b)
        .take_while(|&(code, _)| code != 0xDA)
        .find(|&(code, _)| matches!(code, 0xC0..=0xCF) && !matches!(code, 0xC4 | 0xC8 | 0xCC))?;
    let (h, w) = (u16::from_be_bytes([*p.get(1)?, *p.get(2)?]), u16::from_be_bytes([*p.get(3)?, *p.get(4)?]));
    Some((u32::from(w), u32::from(h), *p.get(5)?, matches!(code, 0xC2 | 0xC6 | 0xCA | 0xCE)))
}

/// Bytes of memory decoding and preprocessing `bytes` will take at its peak, from the header
/// alone, so that a memory budget can be reserved before anything is allocated. Refuses what
/// `decode` would refuse from the header (no pixels, too many, too flat). An upper bound: the
/// decoded image (in the file's own pixel format for image-rs, then as RGB8 unless it is that
/// already), an upright copy when the EXIF orientation asks for one, libjpeg's whole-image
/// coefficients for a progressive JPEG, and the resize's two buffers.
pub fn decode_cost(bytes: &[u8], limits: DecodeLimits, p: &Preprocess) -> Result<u64, DecodeError> {
    let format = sniff(bytes).ok_or(DecodeError::Unsupported)?;
    let (w, h, native, extra, rotated) = if format == ImageFormat::Jpeg {
        let (w, h, components, progressive) =
            jpeg_frame(bytes).ok_or(DecodeError::Corrupt { format: "JPEG", reason: "no frame header".into() })?;
        check_size(w, h, limits)?;
        let full = u64::from(w) * u64::from(h);
        let d = jpeg_denominator(w, h, limits, p.resize);
        let (dw, dh) = (w.div_ceil(d), h.div_ceil(d));
        // CMYK (4 components) goes through image-rs at full size.
        let native = if components == 4 { 4 * full } else { 3 * u64::from(dw) * u64::from(dh) };
        let coefficients = if progressive { 2 * full * u64::from(components.min(3)) } else { 0 };
        let (w, h) = if components == 4 { (w, h) } else { (dw, dh) };
        let cmyk_to_rgb = if components == 4 { 3 * full } else { 0 };
        (w, h, native, coefficients + cmyk_to_rgb, jpeg_orientation(bytes) != Orientation::NoTransforms)
    } else {
        let reader = ImageReader::with_format(Cursor::new(bytes), format);
        let corrupt = |e: image::ImageError| DecodeError::Corrupt { format: "PNG or WebP", reason: e.to_string() };
        let mut decoder = reader.into_decoder().map_err(corrupt)?;
        let (w, h) = decoder.dimensions();
        check_size(w, h, limits)?;
        let to_rgb = if decoder.color_type() == image::ColorType::Rgb8 { 0 } else { 3 * u64::from(w) * u64::from(h) };
        let rotated = decoder.orientation().is_ok_and(|o| o != Orientation::NoTransforms);
        (w, h, decoder.total_bytes(), to_rgb, rotated)
    };
    let (rw, rh) = resized_size(w, h, p.resize)?;
    let upright = if rotated { 3 * u64::from(w) * u64::from(h) } else { 0 };
    let resize = 3 * u64::from(rw) * (u64::from(rh) + u64::from(h));
    Ok(native + extra + upright + resize)
}

/// A JPEG's markers in file order, from just after SOI: (code, payload), the payload empty for
/// markers without a length (RSTn, TEM, EOI). Segments are skipped by their length (so an EXIF
/// thumbnail's own EOI is not mistaken for ours); after SOS, the entropy-coded data is skipped up
/// to the next real marker (there, 0xFF is followed by 0x00 for stuffing, or by RSTn). Ends at EOI,
/// or where the data runs out or stops making sense.
fn jpeg_markers(b: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut i = if b.starts_with(&[0xFF, 0xD8]) { 2 } else { b.len() };
    let mut in_scan = false;
    std::iter::from_fn(move || {
        while in_scan {
            i += b.get(i..)?.iter().position(|&x| x == 0xFF)?;
            match b.get(i + 1)? {
                0x00 | 0xD0..=0xD7 => i += 2,
                _ => in_scan = false,
            }
        }
        // A marker: one or more 0xFF, then its code.
        while b.get(i) == Some(&0xFF) {
            i += 1;
        }
        let code = *b.get(i)?;
        i += 1;
        match code {
            0xD9 => i = b.len(), // nothing after EOI is ours (motion photos append a video)
            0x01 | 0xD0..=0xD7 => {}
            _ => {
                let len = usize::from(u16::from_be_bytes(b.get(i..i + 2)?.try_into().ok()?));
                let payload = b.get(i + 2..i + len.checked_sub(2)? + 2)?;
                i += len;
                in_scan = code == 0xDA;
                return Some((code, payload));
            }
        }
        Some((code, &[][..]))
    })
}

/// Whether a JPEG's structure reaches the EOI marker (decoders fill what is missing with grey).
pub fn jpeg_is_complete(b: &[u8]) -> bool {
    jpeg_markers(b).any(|(code, _)| code == 0xD9)
}

/// The orientation in a JPEG's EXIF segment (APP1, "Exif\0\0" then a TIFF header), if any.
fn jpeg_orientation(b: &[u8]) -> Orientation {
    jpeg_markers(b)
        .take_while(|&(code, _)| code != 0xDA)
        .find_map(|(code, payload)| if code == 0xE1 { payload.strip_prefix(b"Exif\0\0") } else { None })
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms)
}

/// torchvision's `Resize(side)` output size: the shorter side becomes `side`, the longer one
/// `int(side * long / short)` (truncated, as torchvision computes it). Refused above
/// `side` x `side` x `MAX_ASPECT` pixels, computed in u64 so that no shape overflows.
pub fn resized_size(width: u32, height: u32, side: u32) -> Result<(u32, u32), DecodeError> {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    if short == 0 {
        return Err(DecodeError::Empty);
    }
    let long_new = u64::from(side) * u64::from(long) / u64::from(short);
    let resized = long_new * u64::from(side);
    let limit = u64::from(side) * u64::from(side) * MAX_ASPECT;
    if resized > limit {
        return Err(DecodeError::BadShape { width, height, side, resized, limit });
    }
    let long_new = long_new as u32; // at most side x MAX_ASPECT
    Ok(if width <= height { (side, long_new) } else { (long_new, side) })
}

/// torchvision's `CenterCrop` offset: `int(round((size - crop) / 2))`, with Python's
/// round-half-to-even (so 58.5 rounds to 58, not 59).
pub fn crop_offset(size: u32, crop: u32) -> u32 {
    let twice = size.saturating_sub(crop); // (size - crop) / 2 == twice / 2
    let (q, r) = (twice / 2, twice % 2);
    if r == 1 && q % 2 == 1 { q + 1 } else { q }
}

/// Buffers up to this size stay with a thread between images (a 12 MP photo's RGB).
const KEEP_BYTES: usize = 36 << 20;

/// Decoding and preprocessing state, kept from image to image (one per thread): the TurboJPEG
/// handle, the decoded and resized pixel buffers, and the resizer's scratch space. Nothing is
/// allocated per image once the buffers have grown to the largest photo seen.
#[derive(Default)]
pub struct Preprocessor {
    resizer: Resizer,
    jpeg: Option<jpeg::Decoder>,
    /// The decoded image, RGB8, upright.
    rgb: Vec<u8>,
    /// The resized image, before the centre crop.
    resized: Vec<u8>,
}

thread_local! {
    static LOCAL: std::cell::RefCell<Preprocessor> = std::cell::RefCell::new(Preprocessor::default());
}

impl Preprocessor {
    /// Runs `f` with this thread's preprocessor (blocking-pool threads live on, and so do its buffers).
    pub fn with_local<R>(f: impl FnOnce(&mut Preprocessor) -> R) -> R {
        LOCAL.with_borrow_mut(f)
    }

    /// Decodes into `self.rgb`, upright, for a resize of the shorter side to `resize` (which
    /// picks the JPEG's DCT scale); returns the size.
    fn decode(&mut self, bytes: &[u8], limits: DecodeLimits, resize: u32) -> Result<(u32, u32), DecodeError> {
        let format = sniff(bytes).ok_or(DecodeError::Unsupported)?;
        if format == ImageFormat::Jpeg {
            // JPEG decoders fill missing data with grey instead of failing; check the structure first.
            if !jpeg_is_complete(bytes) {
                return Err(DecodeError::TruncatedJpeg);
            }
            if let Some(size) = self.decode_jpeg(bytes, limits, resize)? {
                return Ok(size);
            }
        }
        let name = match format {
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::Png => "PNG",
            _ => "WebP",
        };
        let corrupt = |e: image::ImageError| DecodeError::Corrupt { format: name, reason: e.to_string() };
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut lim = Limits::default();
        // Backstop for decoders that allocate beyond the frame (the explicit check gives the message).
        lim.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(64 << 20));
        reader.limits(lim);
        let mut decoder = reader.into_decoder().map_err(corrupt)?;
        let (width, height) = decoder.dimensions();
        check_size(width, height, limits)?;
        let orientation = decoder.orientation().map_err(corrupt)?;
        let img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
        Ok(self.keep_upright(img, orientation))
    }

    /// Turns `img` upright into `self.rgb` as RGB8 (PIL's convert("RGB"): alpha dropped, grey
    /// replicated); returns the size.
    fn keep_upright(&mut self, mut img: DynamicImage, orientation: Orientation) -> (u32, u32) {
        img.apply_orientation(orientation);
        let rgb = img.into_rgb8();
        let size = rgb.dimensions();
        self.rgb = rgb.into_raw();
        size
    }

    /// A JPEG through libjpeg-turbo, at a DCT scale with `fast_jpeg`. None for what it cannot
    /// give as 8-bit RGB (CMYK, 12-bit), which image-rs decodes instead.
    fn decode_jpeg(
        &mut self,
        bytes: &[u8],
        limits: DecodeLimits,
        resize: u32,
    ) -> Result<Option<(u32, u32)>, DecodeError> {
        let corrupt = |e: jpeg::JpegError| DecodeError::Corrupt { format: "JPEG", reason: e.to_string() };
        let decoder = match &mut self.jpeg {
            Some(d) => d,
            None => self.jpeg.insert(jpeg::Decoder::new().map_err(corrupt)?),
        };
        let header = decoder.header(bytes).map_err(corrupt)?;
        check_size(header.width, header.height, limits)?;
        if !header.rgb {
            return Ok(None);
        }
        let denom = jpeg_denominator(header.width, header.height, limits, resize);
        let (w, h) = decoder.decode_rgb(bytes, denom, &mut self.rgb).map_err(corrupt)?;
        let orientation = jpeg_orientation(bytes);
        if orientation == Orientation::NoTransforms {
            return Ok(Some((w, h)));
        }
        let stored = RgbImage::from_raw(w, h, std::mem::take(&mut self.rgb)).expect("decoded w x h x 3 bytes");
        Ok(Some(self.keep_upright(DynamicImage::ImageRgb8(stored), orientation)))
    }

    /// Bytes -> normalised CHW tensor as profile `p` prepares it, written into `out`
    /// (`p.tensor_len()` floats). Buffers grown past `KEEP_BYTES` by an outlier are let go
    /// afterwards: threads live on, and a few huge images would otherwise pin their peak for good.
    pub fn tensor_into(
        &mut self,
        bytes: &[u8],
        limits: DecodeLimits,
        p: &Preprocess,
        out: &mut [f32],
    ) -> Result<(), DecodeError> {
        let result = self.tensor_into_kept(bytes, limits, p, out);
        if self.rgb.capacity() > KEEP_BYTES || self.resized.capacity() > KEEP_BYTES {
            (self.rgb, self.resized, self.resizer) = (Vec::new(), Vec::new(), Resizer::new());
        }
        result
    }

    fn tensor_into_kept(
        &mut self,
        bytes: &[u8],
        limits: DecodeLimits,
        p: &Preprocess,
        out: &mut [f32],
    ) -> Result<(), DecodeError> {
        assert_eq!(out.len(), p.tensor_len());
        let (w, h) = self.decode(bytes, limits, p.resize)?;
        let (rw, rh) = resized_size(w, h, p.resize)?;
        let src = ImageRef::new(w, h, &self.rgb, PixelType::U8x3).expect("decoded w x h x 3 bytes");
        self.resized.resize(3 * rw as usize * rh as usize, 0);
        let mut dst = Image::from_slice_u8(rw, rh, &mut self.resized, PixelType::U8x3).expect("sized above");
        let filter = match p.filter {
            ResizeFilter::Bilinear => FilterType::Bilinear,
            ResizeFilter::Bicubic => FilterType::CatmullRom,
        };
        let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(filter));
        self.resizer.resize(&src, &mut dst, &opts).expect("same pixel types");

        let crop = p.crop as usize;
        let (left, top) = (crop_offset(rw, p.crop) as usize, crop_offset(rh, p.crop) as usize);
        let plane = crop * crop;
        let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * p.std[c]));
        let shift: [f32; 3] = std::array::from_fn(|c| -p.mean[c] / p.std[c]);
        for y in 0..crop {
            let row = &self.resized[((top + y) * rw as usize + left) * 3..][..crop * 3];
            for (x, px) in row.chunks_exact(3).enumerate() {
                let i = y * crop + x;
                for c in 0..3 {
                    out[c * plane + i] = px[c] as f32 * scale[c] + shift[c];
                }
            }
        }
        Ok(())
    }

    /// Bytes -> a new tensor.
    pub fn from_bytes(&mut self, bytes: &[u8], limits: DecodeLimits, p: &Preprocess) -> Result<Vec<f32>, DecodeError> {
        let mut out = vec![0.0; p.tensor_len()];
        self.tensor_into(bytes, limits, p, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TV: Preprocess = Preprocess::TORCHVISION;
    use std::path::PathBuf;

    #[test]
    fn resize_matches_torchvision_sizes() {
        assert_eq!(resized_size(451, 300, 256).unwrap(), (384, 256)); // int(256 * 451 / 300) = 384
        assert_eq!(resized_size(300, 451, 256).unwrap(), (256, 384));
        assert_eq!(resized_size(512, 512, 256).unwrap(), (256, 256));
        assert_eq!(resized_size(741, 500, 256).unwrap(), (379, 256)); // 379.39 truncated
        assert_eq!(resized_size(8192, 256, 256).unwrap(), (8192, 256)); // 32:1, the flattest allowed
    }

    /// A PNG of `width` x `height` grey pixels, compressed to almost nothing.
    fn flat_png(width: u32, height: u32) -> Vec<u8> {
        let mut png = Vec::new();
        let enc = image::codecs::png::PngEncoder::new(&mut png);
        let pixels = vec![128u8; width as usize * height as usize];
        image::ImageEncoder::write_image(enc, &pixels, width, height, image::ExtendedColorType::L8).unwrap();
        png
    }

    #[test]
    fn large_jpegs_decode_at_a_dct_scale_and_costs_are_known_from_the_header() {
        let flat = RgbImage::from_pixel(8000, 8000, image::Rgb([90, 120, 200]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 80).encode_image(&flat).unwrap();
        let limits = DecodeLimits::default();
        // 64 MP: 1/8 scale keeps the shorter side at 1000 (>= 512), 3 MB instead of 192 MB.
        assert_eq!(decode(&jpeg, limits).unwrap().dimensions(), (1000, 1000));
        let cost = decode_cost(&jpeg, limits, &TV).unwrap();
        assert!(cost < 12 << 20, "{cost} bytes for a 1000x1000 decode");
        let exact = DecodeLimits { exact_max_pixels: u64::MAX, ..limits };
        assert!(decode_cost(&jpeg, exact, &TV).unwrap() > 3 * 64_000_000, "the exact path decodes 192 MB");
        // A PNG cannot be scaled while decoding: its cost is the whole image (grey, then as RGB).
        let png = flat_png(4000, 4000);
        let cost = decode_cost(&png, limits, &TV).unwrap();
        assert!((16_000_000 * 4..16_000_000 * 5).contains(&cost), "{cost}");
        // Refusals come from the header too.
        assert!(matches!(decode_cost(&flat_png(1, 1_000_000), limits, &TV), Err(DecodeError::BadShape { .. })));
        assert!(matches!(decode_cost(b"GIF89a", limits, &TV), Err(DecodeError::Unsupported)));
        // After an outlier, the thread's buffers do not stay at its size.
        let mut p = Preprocessor::default();
        p.from_bytes(&png, limits, &TV).unwrap();
        assert!(p.rgb.capacity() <= KEEP_BYTES && p.resized.capacity() <= KEEP_BYTES);
    }

    #[test]
    fn thin_images_are_refused_before_the_resize_allocates() {
        // 1 x 1,000,000: 1 MP decoded, but 256 x 256,000,000 resized (65 GB of RGB).
        let thin = flat_png(1, 1_000_000);
        let err = Preprocessor::default().from_bytes(&thin, DecodeLimits::default(), &TV).unwrap_err();
        assert!(matches!(err, DecodeError::BadShape { width: 1, height: 1_000_000, .. }), "{err}");
        // The same from the other side, and the largest sizes: no overflow anywhere.
        assert!(matches!(resized_size(65_000, 1, 256), Err(DecodeError::BadShape { .. })));
        assert!(matches!(resized_size(u32::MAX, 1, 256), Err(DecodeError::BadShape { .. })));
        assert!(matches!(resized_size(u32::MAX, u32::MAX, 256), Ok((256, 256))));
        // A 33:1 strip is refused, a 20:1 one is embedded.
        assert!(Preprocessor::default().from_bytes(&flat_png(33 * 40, 40), DecodeLimits::default(), &TV).is_err());
        assert!(Preprocessor::default().from_bytes(&flat_png(20 * 40, 40), DecodeLimits::default(), &TV).is_ok());
    }

    #[test]
    fn crop_offset_rounds_half_to_even() {
        assert_eq!(crop_offset(256, 224), 16);
        assert_eq!(crop_offset(341, 224), 58); // round(58.5) = 58 in Python
        assert_eq!(crop_offset(343, 224), 60); // round(59.5) = 60
        assert_eq!(crop_offset(379, 224), 78); // round(77.5) = 78
        assert_eq!(crop_offset(224, 224), 0);
    }

    /// `rocket-exif6.jpg`'s EXIF segment (orientation 6) spliced into a large JPEG of `img`
    /// stored rotated, as a camera would write it.
    fn large_exif6_jpeg() -> (Vec<u8>, image::RgbImage) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let upright = image::open(dir.join("photos/retina.jpg"))
            .unwrap()
            .resize_exact(1200, 800, image::imageops::FilterType::Triangle)
            .to_rgb8();
        let stored = image::imageops::rotate270(&upright);
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 92).encode_image(&stored).unwrap();
        let donor = std::fs::read(dir.join("rocket-exif6.jpg")).unwrap();
        let at = donor.windows(2).position(|w| w == [0xFF, 0xE1]).unwrap();
        let len = u16::from_be_bytes([donor[at + 2], donor[at + 3]]) as usize;
        jpeg.splice(2..2, donor[at..at + 2 + len].iter().copied());
        (jpeg, upright)
    }

    #[test]
    fn fast_jpeg_decodes_large_photos_scaled_and_upright() {
        let (jpeg, upright) = large_exif6_jpeg();
        let fast = DecodeLimits { fast_jpeg: true, ..Default::default() };
        // 800 px on the short side: decoded at 1/2 (600x400 upright), still above the 256 target.
        let scaled = decode(&jpeg, fast).unwrap();
        assert_eq!(scaled.dimensions(), (600, 400));
        assert_eq!((dct_denominator(800, 256), dct_denominator(511, 256), dct_denominator(2048, 256)), (2, 1, 8));
        let exact = decode(&jpeg, DecodeLimits::default()).unwrap();
        assert_eq!(exact.dimensions(), upright.dimensions());
        // After preprocessing, both paths give nearly the same tensor.
        let mut p = Preprocessor::default();
        let (a, b) =
            (p.from_bytes(&jpeg, fast, &TV).unwrap(), p.from_bytes(&jpeg, DecodeLimits::default(), &TV).unwrap());
        let mean = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
        assert!(mean < 0.03, "mean difference {mean} (one grey level is about 0.017)");
        // Small photos are decoded whole; truncated ones are refused on both paths.
        let small = std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rocket.jpg")).unwrap();
        assert_eq!(decode(&small, fast).unwrap().dimensions(), (640, 427));
        assert!(matches!(decode(&jpeg[..jpeg.len() / 2], fast), Err(DecodeError::TruncatedJpeg)));
    }

    #[test]
    fn sniffing_ignores_names_and_refuses_text() {
        assert!(sniff(b"hello, I am a text file named cat.jpg").is_none());
        assert!(matches!(decode(b"GIF89a....", DecodeLimits::default()), Err(DecodeError::Unsupported)));
    }
}

/// Parity with torchvision, on the committed fixtures (tests/fixtures/README.md says how they were made).
#[cfg(test)]
mod parity {
    use super::*;

    const TV: Preprocess = Preprocess::TORCHVISION;
    use std::path::PathBuf;

    fn fixture(name: &str) -> Vec<u8> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// Our tensor for `image`, as 8-bit levels (undoing the normalisation), next to the reference levels.
    fn levels(image: &str, reference: &str) -> (Vec<f32>, Vec<u8>) {
        levels_as(image, reference, &TV)
    }

    fn levels_as(image: &str, reference: &str, p: &Preprocess) -> (Vec<f32>, Vec<u8>) {
        let t = Preprocessor::default().from_bytes(&fixture(image), DecodeLimits::default(), p).unwrap();
        let plane = p.tensor_len() / 3;
        let ours = t.iter().enumerate().map(|(i, x)| (x * p.std[i / plane] + p.mean[i / plane]) * 255.0).collect();
        (ours, fixture(reference))
    }

    /// (max, mean) absolute difference in grey levels.
    fn diff(ours: &[f32], reference: &[u8]) -> (f32, f32) {
        assert_eq!(ours.len(), reference.len());
        let d: Vec<f32> = ours.iter().zip(reference).map(|(a, &b)| (a - b as f32).abs()).collect();
        (d.iter().cloned().fold(0.0, f32::max), d.iter().sum::<f32>() / d.len() as f32)
    }

    #[test]
    fn matches_torchvision_on_png_jpeg_grey_and_rgba() {
        for stem in ["chelsea.png", "rocket.jpg", "camera.png", "logo.png"] {
            let base = stem.split('.').next().unwrap();
            let (ours, reference) = levels(stem, &format!("{base}.levels.u8"));
            let (max, mean) = diff(&ours, &reference);
            eprintln!("{stem}: max {max:.3} mean {mean:.4} grey levels");
            // JPEGs decode to PIL's very pixels (both use libjpeg-turbo); PIL and fast_image_resize
            // then resample in 8-bit fixed point and differ by rounding alone.
            // Measured: max 1 level, mean 0.06-0.20 (the JPEG 0.071; 0.075 and max 2 with zune-jpeg).
            assert!(max <= 1.001 && mean <= 0.25, "{stem}: max {max} mean {mean} grey levels off torchvision");
        }
    }

    #[test]
    fn the_clip_profile_matches_pil_bicubic() {
        for stem in ["chelsea.png", "rocket.jpg"] {
            let base = stem.split('.').next().unwrap();
            let (ours, reference) = levels_as(stem, &format!("{base}.clip.levels.u8"), &Preprocess::CLIP);
            let (max, mean) = diff(&ours, &reference);
            eprintln!("{stem}, clip: max {max:.3} mean {mean:.4} grey levels");
            // Rounding differences of two fixed-point resamplers, as on the bilinear path (bicubic's
            // overshoot is clamped, so a level more at edges). Measured: max 2-3, mean 0.09-0.22.
            assert!(max <= 3.001 && mean <= 0.25, "{stem}: max {max} mean {mean} grey levels off PIL's bicubic");
        }
        let bilinear = Preprocess { filter: ResizeFilter::Bilinear, ..Preprocess::CLIP };
        let (ours, reference) = levels_as("chelsea.png", "chelsea.clip.levels.u8", &bilinear);
        let (max, mean) = diff(&ours, &reference);
        // The wrong filter is far off: measured max 21, mean 0.99.
        assert!(max > 10.0 && mean > 0.5, "bilinear passes for bicubic: max {max} mean {mean}");
    }

    #[test]
    fn lossless_webp_gives_the_png_tensor() {
        let (ours, reference) = levels("chelsea.webp", "chelsea.levels.u8");
        let (max, _) = diff(&ours, &reference);
        assert!(max <= 1.001, "webp max diff {max}");
    }

    #[test]
    fn exif_orientation_is_applied() {
        let img = decode(&fixture("rocket-exif6.jpg"), DecodeLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (640, 427), "stored 427x640 sideways, shown 640x427");
        let (ours, reference) = levels("rocket-exif6.jpg", "rocket.levels.u8");
        let (_, mean) = diff(&ours, &reference);
        // Re-encoded at quality 95, so not exact; a wrong rotation is off by tens of levels.
        assert!(mean < 3.0, "rotated rocket mean diff {mean} grey levels");
    }

    #[test]
    fn bombs_are_refused_from_the_header() {
        // A 20000x20000 PNG header: refused before any pixel is allocated.
        let mut png = Vec::new();
        let enc = image::codecs::png::PngEncoder::new(&mut png);
        image::ImageEncoder::write_image(enc, &[0u8; 3 * 64 * 64], 64, 64, image::ExtendedColorType::Rgb8).unwrap();
        // Patch the IHDR width/height (bytes 16..24) and its CRC.
        png[16..20].copy_from_slice(&20000u32.to_be_bytes());
        png[20..24].copy_from_slice(&20000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        match decode(&png, DecodeLimits::default()) {
            Err(DecodeError::TooLarge { width: 20000, height: 20000, .. }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn truncated_jpegs_are_refused() {
        let jpeg = fixture("rocket.jpg");
        assert!(jpeg_is_complete(&jpeg));
        assert!(jpeg_is_complete(&fixture("rocket-exif6.jpg")), "EXIF segment skipped by length");
        for cut in [jpeg.len() / 3, jpeg.len() - 2, 20] {
            let err = decode(&jpeg[..cut], DecodeLimits::default()).map(|_| ()).unwrap_err();
            assert!(matches!(err, DecodeError::TruncatedJpeg), "cut at {cut}: {err}");
        }
        // Trailing bytes after the EOI (motion photos append a video) are fine.
        let mut longer = jpeg.clone();
        longer.extend_from_slice(b"appended video bytes");
        assert!(decode(&longer, DecodeLimits::default()).is_ok());
    }

    #[test]
    fn damaged_but_decodable_and_cmyk_jpegs_decode() {
        // Scan data cut short before the end marker: libjpeg warns ("premature end of data segment")
        // and fills the rest with grey, as PIL does (the whole file is there; only its data is not).
        let mut jpeg = fixture("rocket.jpg");
        jpeg.drain(jpeg.len() / 2..jpeg.len() - 2);
        assert!(jpeg_is_complete(&jpeg));
        assert_eq!(decode(&jpeg, DecodeLimits::default()).unwrap().dimensions(), (640, 427));
        // CMYK: not something TurboJPEG outputs as RGB, so image-rs decodes it.
        let rgb = decode(&fixture("rocket-cmyk.jpg"), DecodeLimits::default()).unwrap();
        assert_eq!(rgb.dimensions(), (96, 64));
        let source = image::open(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rocket.jpg"))
            .unwrap()
            .resize_exact(96, 64, image::imageops::FilterType::Triangle)
            .to_rgb8();
        let mean =
            rgb.iter().zip(source.iter()).map(|(&a, &b)| (a as f32 - b as f32).abs()).sum::<f32>() / rgb.len() as f32;
        assert!(mean < 8.0, "CMYK JPEG decoded {mean} grey levels off its source on average");
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
