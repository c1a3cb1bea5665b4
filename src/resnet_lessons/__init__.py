"""resnet_lessons: the library behind the ResNet / CIFAR-10 book.

Importing the package is cheap and has no side effects; import the modules you need
(``resnet_lessons.models``, ``resnet_lessons.data``, ``resnet_lessons.train``, ...).
"""

__version__ = "0.1.0"
