// The original complete-task's image thumbnail: the image at a third of its size (at least 1 px a side),
// as a quality-80 JPEG. Pure JavaScript codecs (jpeg-js, UPNG), so it runs in the edge runtime, which
// loads no native modules; other formats (WebP, GIF) get no made thumbnail (the caller falls back).
import jpeg from "npm:jpeg-js@0.4.4";
import UPNG from "npm:upng-js@2.1.0";

export const IMAGE_THUMBNAIL_SCALE = 1 / 3;
export const IMAGE_THUMBNAIL_QUALITY = 80;
const MAX_DECODED_PIXELS = 64 * 1024 * 1024; // refuse decompression bombs

type Rgba = { width: number; height: number; data: Uint8Array };

function decodeImage(bytes: Uint8Array): Rgba | null {
  if (bytes[0] === 0xff && bytes[1] === 0xd8) {
    const image = jpeg.decode(bytes, { useTArray: true, maxResolutionInMP: MAX_DECODED_PIXELS / 1e6 });
    return { width: image.width, height: image.height, data: image.data };
  }
  if (bytes[0] === 0x89 && bytes[1] === 0x50 && bytes[2] === 0x4e && bytes[3] === 0x47) {
    const image = UPNG.decode(bytes.slice().buffer);
    if (image.width * image.height > MAX_DECODED_PIXELS) return null;
    const [frame] = UPNG.toRGBA8(image);
    return { width: image.width, height: image.height, data: new Uint8Array(frame) };
  }
  return null;
}

/** Whether `bytes` are a whole JPEG image that decodes (within the pixel limit). */
export function decodesAsJpeg(bytes: Uint8Array): boolean {
  if (bytes.length < 4 || bytes[0] !== 0xff || bytes[1] !== 0xd8 || bytes[2] !== 0xff) return false;
  try {
    const image = decodeImage(bytes);
    return image !== null && image.width > 0 && image.height > 0;
  } catch (_error) {
    return false;
  }
}

/** Area-average downscale of RGBA pixels to width × height (each output pixel averages its source box). */
function downscale(src: Rgba, width: number, height: number): Rgba {
  const out = new Uint8Array(width * height * 4);
  for (let y = 0; y < height; y++) {
    const y0 = Math.floor(y * src.height / height),
      y1 = Math.max(y0 + 1, Math.floor((y + 1) * src.height / height));
    for (let x = 0; x < width; x++) {
      const x0 = Math.floor(x * src.width / width),
        x1 = Math.max(x0 + 1, Math.floor((x + 1) * src.width / width));
      const sum = [0, 0, 0, 0];
      for (let sy = y0; sy < y1; sy++) {
        for (let sx = x0; sx < x1; sx++) {
          const i = (sy * src.width + sx) * 4;
          for (let c = 0; c < 4; c++) sum[c] += src.data[i + c];
        }
      }
      const n = (y1 - y0) * (x1 - x0), o = (y * width + x) * 4;
      for (let c = 0; c < 4; c++) out[o + c] = Math.round(sum[c] / n);
    }
  }
  return { width, height, data: out };
}

/** A third-size JPEG of a PNG or JPEG image's bytes, or null when they do not decode as one. */
export function imageThumbnail(bytes: Uint8Array): Uint8Array<ArrayBuffer> | null {
  let image: Rgba | null;
  try {
    image = decodeImage(bytes);
  } catch (_error) {
    return null;
  }
  if (image === null || image.width < 1 || image.height < 1) return null;
  const width = Math.max(1, Math.round(image.width * IMAGE_THUMBNAIL_SCALE));
  const height = Math.max(1, Math.round(image.height * IMAGE_THUMBNAIL_SCALE));
  const small = downscale(image, width, height);
  return new Uint8Array(jpeg.encode(small, IMAGE_THUMBNAIL_QUALITY).data);
}
