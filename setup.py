"""pip install of the pdlm_ros core and the `pdlm-ros` command.

Under colcon the package is built by CMakeLists.txt (ament_cmake + ament_cmake_python), which generates the
messages in msg/ and installs this same Python package; pip users get the core, the ROS-less DDS transport and
rosbag tools without a ROS install.
"""

from glob import glob

from setuptools import find_packages, setup

setup(
    name="pdlm_ros",
    version="0.1.0",
    license="Apache-2.0",
    description="ROS 2 node that captions every region of a camera frame in one parallel denoising pass",
    packages=find_packages(include=["pdlm_ros", "pdlm_ros.*"]),
    package_data={"pdlm_ros": ["assets/default/*", "py.typed"]},
    include_package_data=True,
    data_files=[
        ("share/pdlm_ros/launch", glob("launch/*.launch.py")),
        ("share/pdlm_ros/config", glob("config/*.yaml")),
        ("share/pdlm_ros/msg", glob("msg/*.msg")),
    ],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pillow>=10",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "transformers>=4.50",
        "tqdm>=4.60",
        "rich>=13",
        "pyyaml>=6",
        "rosbags>=0.11,<0.12",  # bag salvage uses record readers checked against 0.11
        "matplotlib>=3.7",
    ],
    extras_require={
        "dds": ["cyclonedds>=0.10"],
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        "triton": ["triton>=3.0"],
        "test": ["pytest>=7", "cyclonedds>=0.10", "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1",
                 "triton>=3.0"],
    },
    entry_points={"console_scripts": ["pdlm-ros = pdlm_ros.cli:main"]},
)
