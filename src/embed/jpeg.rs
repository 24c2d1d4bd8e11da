//! JPEG decoding through libjpeg-turbo's TurboJPEG 3 API (the decoder PIL, and so torchvision,
//! uses: same IDCT and chroma upsampling, so the same pixels), built from source and linked
//! statically by `turbojpeg-sys`. It also decodes at 1/2, 1/4 or 1/8 scale in the DCT domain.
//!
//! A thin wrapper rather than the `turbojpeg` crate: that crate turns libjpeg's warnings (a few
//! stray bytes before a marker, common in real photos) into errors and hides the error code that
//! tells them apart. PIL decodes such files, and so do we.

use std::ffi::CStr;

use turbojpeg_sys as tj;

/// Most progressive scans decoded: a file of thousands of tiny scans costs minutes of CPU
/// (libjpeg-turbo's advice for untrusted input). Real encoders write about ten.
const SCAN_LIMIT: i32 = 500;

/// Why libjpeg-turbo would not decode a file.
#[derive(Debug, thiserror::Error)]
pub enum JpegError {
    #[error("TurboJPEG could not be initialised")]
    Init,
    /// A fatal error (warnings pass); libjpeg-turbo's own message.
    #[error("{0}")]
    Fatal(String),
}

/// What the header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub width: u32,
    pub height: u32,
    /// Decodable to RGB here. CMYK and YCCK are not (TurboJPEG only outputs them as CMYK).
    pub rgb: bool,
}

/// One TurboJPEG decompressor, reused from image to image.
pub struct Decoder(tj::tjhandle);

// A handle is used by one thread at a time (`&mut self`), which is all TurboJPEG asks.
unsafe impl Send for Decoder {}

impl Drop for Decoder {
    fn drop(&mut self) {
        unsafe { tj::tj3Destroy(self.0) }
    }
}

impl Decoder {
    pub fn new() -> Result<Self, JpegError> {
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as i32) };
        if handle.is_null() {
            return Err(JpegError::Init);
        }
        let d = Self(handle);
        d.check(unsafe { tj::tj3Set(d.0, tj::TJPARAM_TJPARAM_SCANLIMIT as i32, SCAN_LIMIT) })?;
        Ok(d)
    }

    /// Ok unless `status` reports a fatal error. Warnings (corrupt but decodable data) pass, as in PIL.
    fn check(&self, status: i32) -> Result<(), JpegError> {
        if status == 0 || unsafe { tj::tj3GetErrorCode(self.0) } == tj::TJERR_TJERR_WARNING as i32 {
            return Ok(());
        }
        Err(JpegError::Fatal(unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) }.to_string_lossy().into_owned()))
    }

    pub fn header(&mut self, jpeg: &[u8]) -> Result<Header, JpegError> {
        self.check(unsafe { tj::tj3DecompressHeader(self.0, jpeg.as_ptr(), jpeg.len() as _) })?;
        let get = |param: tj::TJPARAM| unsafe { tj::tj3Get(self.0, param as i32) };
        let (width, height) = (get(tj::TJPARAM_TJPARAM_JPEGWIDTH), get(tj::TJPARAM_TJPARAM_JPEGHEIGHT));
        let colorspace = get(tj::TJPARAM_TJPARAM_COLORSPACE);
        Ok(Header {
            width: width.max(0) as u32,
            height: height.max(0) as u32,
            rgb: [tj::TJCS_TJCS_RGB, tj::TJCS_TJCS_YCbCr, tj::TJCS_TJCS_GRAY].iter().any(|&c| c as i32 == colorspace)
                && get(tj::TJPARAM_TJPARAM_PRECISION) == 8,
        })
    }

    /// Decodes to packed RGB8 in `out` (resized to fit, its capacity kept between images), at
    /// 1/`denom` scale (1, 2, 4 or 8). Returns the decoded size.
    pub fn decode_rgb(&mut self, jpeg: &[u8], denom: u32, out: &mut Vec<u8>) -> Result<(u32, u32), JpegError> {
        // The output size comes from these very bytes' header, so the buffer always fits.
        let header = self.header(jpeg)?;
        let scale = tj::tjscalingfactor { num: 1, denom: denom as i32 };
        self.check(unsafe { tj::tj3SetScalingFactor(self.0, scale) })?;
        // TurboJPEG's TJSCALED: ceil(side * num / denom).
        let (w, h) = (header.width.div_ceil(denom), header.height.div_ceil(denom));
        out.resize(3 * w as usize * h as usize, 0);
        let status = unsafe {
            tj::tj3Decompress8(
                self.0,
                jpeg.as_ptr(),
                jpeg.len() as _,
                out.as_mut_ptr(),
                3 * w as i32,
                tj::TJPF_TJPF_RGB,
            )
        };
        self.check(status)?;
        Ok((w, h))
    }
}
